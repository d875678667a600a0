"""Everything save_pretrained covers beside the weights: tokenizer and processor files inside the
same atomic publish, and the Hub upload (against huggingface_hub's HfApi replaced in-process)."""

import concurrent.futures
import fnmatch
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dist_saver import CheckpointError, SaveError, dist_save, load_state_dict, push_to_hub  # noqa: E402
from dist_saver import format as fmt  # noqa: E402
from dist_saver.cli import main as cli  # noqa: E402
from dist_saver.index import looks_like_our_checkpoint  # noqa: E402

from .dist_utils import run_ranks  # noqa: E402
from .test_transformers import _fsdp, tiny_llama  # noqa: E402

TEXT = "hello dist saver world unknown"


def make_tokenizer():
    """A real fast tokenizer built locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3, "dist": 4, "saver": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


class Processor:
    """Anything with save_pretrained counts as a processor."""

    def __init__(self, files):
        self.files = files

    def save_pretrained(self, directory):
        for name, text in self.files.items():
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)


def _save_with_tokenizer(rank, world, path, overwrite):
    tokenizer = make_tokenizer() if rank == 0 else None  # only rank 0's is used
    dist_save(_fsdp(tiny_llama(seed=0), world), path, tokenizer=tokenizer,
              processor=Processor({"preprocessor_config.json": '{"size": 4}'}), overwrite=overwrite)


def test_tokenizer_and_processor_round_trip_and_overwrite(tmp_path):
    path = str(tmp_path / "llama")
    run_ranks(_save_with_tokenizer, 2, path, False)
    loaded = transformers.AutoTokenizer.from_pretrained(path)
    assert loaded(TEXT)["input_ids"] == make_tokenizer()(TEXT)["input_ids"] == [2, 4, 5, 3, 0]
    with open(os.path.join(path, "preprocessor_config.json")) as f:
        assert json.load(f) == {"size": 4}
    with open(os.path.join(path, fmt.INDEX_NAME)) as f:
        listed = json.load(f)["metadata"]["dist_saver"]["extra_files"]
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "preprocessor_config.json"} <= set(listed)
    # the directory holds only files our index lists, so a second save may replace it
    run_ranks(_save_with_tokenizer, 2, path, True)
    assert transformers.AutoTokenizer.from_pretrained(path)(TEXT)["input_ids"] == [2, 4, 5, 3, 0]


def test_tokenizer_files_are_published_with_the_index_not_before(tmp_path, monkeypatch):
    from dist_saver.commit import Target

    path = str(tmp_path / "ck")
    seen = {}
    real = Target.publish

    def spy(self):
        seen["staged"] = sorted(os.listdir(self.staging))
        seen["visible"] = os.path.exists(path)
        real(self)

    monkeypatch.setattr(Target, "publish", spy)
    dist_save({"w": torch.ones(4)}, path, tokenizer=make_tokenizer())
    assert not seen["visible"]
    assert {"tokenizer.json", "tokenizer_config.json", fmt.INDEX_NAME} <= set(seen["staged"])
    assert sorted(os.listdir(path)) == seen["staged"]


def test_a_failing_or_clashing_processor_leaves_the_old_checkpoint(tmp_path):
    path = str(tmp_path / "ck")
    dist_save({"w": torch.ones(4)}, path, tokenizer=make_tokenizer())
    before = sorted(os.listdir(path))

    class Broken:
        def save_pretrained(self, directory):
            raise OSError("disk full while saving the processor")

    # an error on rank 0 reaches every rank in the first collective, as a SaveError naming it
    with pytest.raises(SaveError, match="rank 0: OSError: disk full"):
        dist_save({"w": torch.zeros(4)}, path, processor=Broken(), overwrite=True)
    with pytest.raises(SaveError, match="writes the weights and their index itself"):
        dist_save({"w": torch.zeros(4)}, path, overwrite=True,
                  processor=Processor({fmt.INDEX_NAME: "{}", "x.json": "{}"}))
    with pytest.raises(SaveError, match="no save_pretrained"):
        dist_save({"w": torch.zeros(4)}, path, overwrite=True, tokenizer="gpt2")
    assert sorted(os.listdir(path)) == before
    assert not any(n.startswith(".ck.dist_saver") for n in os.listdir(tmp_path))


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        FakeHub.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, delete_patterns, **kw):
        paths = sorted(os.path.relpath(os.path.join(r, f), folder_path)
                       for r, _, fs in os.walk(folder_path) for f in fs)
        uploaded = [n for n in paths if any(fnmatch.fnmatch(n, p) for p in allow_patterns)]
        FakeHub.calls.append(("upload_folder", repo_id, {
            "folder_path": folder_path, "uploaded": [n for n in uploaded if "/" not in n],
            "uploaded_paths": uploaded, "delete_patterns": delete_patterns,
            "index_present": os.path.exists(os.path.join(folder_path, fmt.INDEX_NAME)),
            "siblings": sorted(os.listdir(os.path.dirname(folder_path)))}))
        return "commit-info"


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub.calls


def test_push_to_hub_uploads_the_published_directory_only(tmp_path, fake_hub):
    path = str(tmp_path / "llama")
    model = tiny_llama(seed=0)
    with open(tmp_path / "stray.txt", "w") as f:  # beside, not inside: never uploaded
        f.write("x")
    res = dist_save(model, path, tokenizer=make_tokenizer(), max_shard_size=20_000, push_to_hub="org/tiny")
    assert res.upload.wait() == "commit-info"
    assert isinstance(res.upload, concurrent.futures.Future) and res.upload.result(timeout=0) == "commit-info"
    (create, upload) = fake_hub
    assert create[:2] == ("create_repo", "org/tiny") and create[2]["exist_ok"]
    assert upload[1] == "org/tiny"
    info = upload[2]
    assert info["folder_path"] == os.path.abspath(path) and info["index_present"]
    shards = sorted(f.name for f in res.files)
    assert len(shards) > 1
    expected = sorted(shards + [fmt.INDEX_NAME, "config.json", "generation_config.json",
                                "tokenizer.json", "tokenizer_config.json"])
    assert info["uploaded"] == expected == sorted(os.listdir(path))
    # published first (no staging left), and still locked: no other save replaces it mid-upload
    assert not any("staging" in s for s in info["siblings"])
    assert any(s.endswith(".lock") for s in info["siblings"])
    assert not any(s.endswith(".lock") for s in os.listdir(tmp_path))
    assert fmt.SINGLE_NAME in info["delete_patterns"]  # a stale single file would shadow the index


def _push_from_ranks(rank, world, path, log_file):
    import huggingface_hub

    class Recorder(FakeHub):
        def upload_folder(self, **kw):
            with open(log_file, "a") as f:
                f.write(f"{rank}\n")

    huggingface_hub.HfApi = Recorder
    res = dist_save({"w": torch.full((8,), float(rank))}, path, push_to_hub="org/x")
    if rank == 0:
        res.upload.wait()
    else:
        assert res.upload is None


def test_push_happens_on_rank_0_only(tmp_path):
    log_file = str(tmp_path / "uploads")
    run_ranks(_push_from_ranks, 2, str(tmp_path / "ck"), log_file)
    with open(log_file) as f:
        assert f.read().split() == ["0"]


def test_push_cli_exit_codes(tmp_path, fake_hub, capsys):
    path = str(tmp_path / "ck")
    dist_save({"a": torch.ones(100), "b": torch.zeros(100)}, path, max_shard_size=500)
    assert cli(["push", path, "org/x", "--private"]) == 0
    assert fake_hub[0][2]["private"] is True
    assert cli(["push", str(tmp_path), "org/x"]) == 2  # not a checkpoint
    shard = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))[0]
    os.remove(os.path.join(path, shard))
    fake_hub.clear()
    assert cli(["push", path, "org/x"]) == 1  # incomplete: nothing is uploaded
    assert "missing" in capsys.readouterr().err and fake_hub == []
    with pytest.raises(CheckpointError, match="missing"):
        push_to_hub(path, "org/x")


def test_a_failed_upload_names_the_saved_checkpoint(tmp_path, fake_hub, monkeypatch):
    def refuse(self, **kw):
        raise PermissionError("401 Unauthorized")

    monkeypatch.setattr(FakeHub, "upload_folder", refuse)
    path = str(tmp_path / "ck")
    res = dist_save({"w": torch.ones(3)}, path, push_to_hub="org/x")
    with pytest.raises(SaveError, match="saved and complete, but pushing it to org/x failed.*401"):
        res.upload.wait()
    assert torch.equal(load_state_dict(path)["w"], torch.ones(3))
    assert not any(n.endswith(".lock") for n in os.listdir(tmp_path))  # the upload released it


def test_async_save_takes_the_tokenizer_at_the_call_and_pushes_after_publishing(tmp_path, fake_hub):
    tok = make_tokenizer()
    path = str(tmp_path / "ck")
    handle = dist_save({"w": torch.ones(3)}, path, tokenizer=tok, async_save=True, push_to_hub="org/x")
    tok.add_tokens(["later"])  # after the call: not in the checkpoint
    handle.wait().upload.wait()
    assert len(transformers.AutoTokenizer.from_pretrained(path)) == 6
    assert [c[0] for c in fake_hub] == ["create_repo", "upload_folder"]
    assert "tokenizer.json" in fake_hub[1][2]["uploaded"]


def test_files_in_subdirectories_round_trip_and_count_as_ours(tmp_path, fake_hub):
    """e.g. transformers' additional_chat_templates/ beside tokenizer_config.json."""
    path = str(tmp_path / "ck")
    files = {"tokenizer_config.json": "{}", "additional_chat_templates/tool_use.jinja": "{{ x }}"}

    class Nested:
        def save_pretrained(self, directory):
            for name, text in files.items():
                os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
                with open(os.path.join(directory, name), "w") as f:
                    f.write(text)

    dist_save({"w": torch.ones(3)}, path, processor=Nested(), push_to_hub="org/x").upload.wait()
    with open(os.path.join(path, "additional_chat_templates", "tool_use.jinja")) as f:
        assert f.read() == "{{ x }}"
    assert "additional_chat_templates/tool_use.jinja" in fake_hub[1][2]["uploaded_paths"]
    dist_save({"w": torch.zeros(3)}, path, processor=Nested(), overwrite=True)  # recognised as ours


def test_overwrite_refuses_what_the_index_does_not_vouch_for(tmp_path):
    path = tmp_path / "ck"
    dist_save({"w": torch.ones(3)}, path, tokenizer=make_tokenizer())
    (path / "runs").mkdir()
    (path / "runs" / "events.log").write_text("user data")
    with pytest.raises(SaveError, match="not written by dist_saver"):
        dist_save({"w": torch.ones(3)}, path, overwrite=True)
    (path / "runs" / "events.log").unlink()
    (path / "runs").rmdir()
    index = json.loads((path / fmt.INDEX_NAME).read_text())
    for bad in ("tokenizer.json", ["runs"], [".."], [5]):  # a string, an unlisted dir, junk
        index["metadata"]["dist_saver"]["extra_files"] = bad
        (path / fmt.INDEX_NAME).write_text(json.dumps(index))
        assert not looks_like_our_checkpoint(str(path)), bad
    assert (path / "tokenizer.json").exists()


def test_push_to_hub_takes_the_lock(tmp_path, fake_hub):
    from dist_saver.commit import Target

    path = str(tmp_path / "ck")
    dist_save({"w": torch.ones(3)}, path)
    with Target(path).locked():  # a save into path is running
        with pytest.raises(SaveError, match="in progress"):
            push_to_hub(path, "org/x")
    assert fake_hub == []
    push_to_hub(path, "org/x")
    assert not any(n.endswith(".lock") for n in os.listdir(tmp_path))


def test_the_upload_runs_detached_and_holds_the_lock(tmp_path, fake_hub, monkeypatch):
    import threading

    release = threading.Event()
    real = FakeHub.upload_folder

    def slow(self, **kw):
        assert release.wait(30)
        return real(self, **kw)

    monkeypatch.setattr(FakeHub, "upload_folder", slow)
    path = str(tmp_path / "ck")
    res = dist_save({"w": torch.ones(3)}, path, push_to_hub="org/x")
    assert not res.upload.done()  # the save returned while the upload runs
    assert not res.upload.cancel() and res.upload.running()  # a started push is not called off
    assert any(n.endswith(".lock") for n in os.listdir(tmp_path))  # nobody replaces it meanwhile
    threading.Timer(0.5, release.set).start()
    # a save into the same path waits for that upload, then replaces the checkpoint
    dist_save({"w": torch.zeros(3)}, path, overwrite=True)
    assert res.upload.done() and res.upload.wait() == "commit-info"
    assert torch.equal(load_state_dict(path)["w"], torch.zeros(3))
