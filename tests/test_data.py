"""Data: the built-in byte corpus, user files, synthetic tokens, and rank-disjoint resumable loaders."""
from array import array

import pytest
import torch

from engine import data


def test_default_corpus_is_deterministic_bytes_with_holdout():
    a, vocab = data.load_tokens("default", cap_bytes=1 << 20)
    b, _ = data.load_tokens("default", cap_bytes=1 << 20)
    assert vocab == 256 and a.numel() == 1 << 20  # every stdlib is larger than 1 MiB of .py
    assert torch.equal(a, b) and int(a.min()) >= 0 and int(a.max()) < 256
    assert b"def " in bytes(a[:200_000].to(torch.uint8).tolist())
    train, val = data.split(a)
    assert val.numel() == int(a.numel() * 0.05) and torch.equal(torch.cat([train, val]), a)


def test_directory_and_bin_files(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_bytes(b"BBB")
    (d / "a.txt").write_bytes(b"AA")
    (d / "sub" / "c.txt").write_bytes(b"C")
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden files are never data (was read into the corpus)
    tokens, vocab = data.load_tokens(str(d))
    assert bytes(tokens.to(torch.uint8).tolist()) == b"AABBBC" and vocab == 256  # sorted, files then subdirs

    values = array("H", [5, 60000, 7, 1, 300])
    (tmp_path / "tok.bin").write_bytes(values.tobytes())
    tokens, vocab = data.load_tokens(str(tmp_path / "tok.bin"))
    assert tokens.tolist() == list(values) and vocab == 60001

    with pytest.raises(ValueError, match="no such file"):
        data.load_tokens(str(tmp_path / "missing"))


def test_ranks_read_disjoint_chunks_and_resume_at_the_same_position():
    tokens = torch.arange(10_000, dtype=torch.int32)
    B, T = 2, 8
    r0, r1 = data.TokenLoader(tokens, B, T, 0, 2), data.TokenLoader(tokens, B, T, 1, 2)
    seen = []
    for _ in range(5):
        for loader in (r0, r1):
            x, y = loader.next_batch()
            assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y.flatten()[:-1], x.flatten()[1:])
            seen.append(int(x[0, 0]))
    # rank r's k-th batch is chunk k*world + r: together the ranks walk consecutive chunks, no overlap
    assert seen == [i * B * T for i in range(10)]

    state = r0.state_dict()
    expected = r0.next_batch()
    fresh = data.TokenLoader(tokens, B, T, 0, 2)
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.next_batch(), expected))


def test_loader_wraps_and_refuses_too_little_data():
    loader = data.TokenLoader(torch.arange(33, dtype=torch.int32), 2, 8, 0, 1)  # exactly 2 chunks
    firsts = [int(loader.next_batch()[0][0, 0]) for _ in range(3)]
    assert firsts == [0, 16, 0] and loader.epoch == 1
    with pytest.raises(ValueError, match="data too small"):
        data.TokenLoader(torch.arange(20, dtype=torch.int32), 2, 8, 0, 2)


def test_synthetic_is_seeded_per_rank_and_position():
    a = data.SyntheticLoader(1000, 2, 16, seed=3, rank=0, world_size=2)
    b = data.SyntheticLoader(1000, 2, 16, seed=3, rank=1, world_size=2)
    xa, _ = a.next_batch()
    xb, _ = b.next_batch()
    assert not torch.equal(xa, xb) and int(xa.max()) < 1000
    again = data.SyntheticLoader(1000, 2, 16, seed=3, rank=0, world_size=2)
    assert torch.equal(again.next_batch()[0], xa)
    state = a.state_dict()
    nxt = a.next_batch()
    resumed = data.SyntheticLoader(1000, 2, 16, seed=3, rank=0, world_size=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(resumed.next_batch(), nxt))


def test_an_empty_or_single_valued_token_file_is_said_plainly(tmp_path):
    from engine.data import load_tokens

    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty token file"):  # not torch.frombuffer's own words
        load_tokens(str(empty))
    zeros = tmp_path / "zeros.bin"
    zeros.write_bytes(bytes(64))
    tokens, vocab = load_tokens(str(zeros))
    assert tokens.numel() == 32 and vocab == 2  # a model needs two outputs; was a "--vocab-size >= 2" traceback


def test_an_empty_data_file_is_named_as_such(tmp_path):
    # Was torch.frombuffer's "both buffer length (0) and count (-1) must not be 0", naming no flag.
    from engine.data import load_tokens

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"^--data {empty}: empty file$"):
        load_tokens(str(empty))


def test_a_fifo_is_never_read(tmp_path):
    """A named pipe in a --data directory (or as --data) blocked the run forever in its read: it is
    skipped in a directory and refused as the data itself. Each call runs with a bound: a hang fails."""
    import os
    import threading

    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_bytes(b"AB")
    os.mkfifo(d / "b.pipe")
    found = {}

    def load(key, spec):
        try:
            found[key] = data.load_tokens(spec)
        except ValueError as exc:
            found[key] = exc

    for key, spec in (("dir", str(d)), ("fifo", str(d / "b.pipe"))):
        t = threading.Thread(target=load, args=(key, spec), daemon=True)
        t.start()
        t.join(10)
        if t.is_alive():  # unblock the reader so the test process can end, then fail
            fd = os.open(d / "b.pipe", os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
            pytest.fail(f"load_tokens({key}) blocked on the FIFO")
    tokens, vocab = found["dir"]
    assert bytes(tokens.to(torch.uint8).tolist()) == b"AB" and vocab == 256
    assert str(found["fifo"]) == f"--data {d / 'b.pipe'}: not a regular file or directory"


def test_a_directory_of_bin_shards_is_read_as_their_tokens_not_as_bytes(tmp_path):
    """nanoGPT-style train_000.bin, train_001.bin: uint16 tokens. Read as bytes (as every directory
    was), a vocabulary of 65536 became 256 and the run trained on nonsense without a word."""
    import torch

    from engine.data import load_tokens

    shards = tmp_path / "shards"
    shards.mkdir()
    a, b = torch.arange(0, 600, dtype=torch.int32), torch.arange(600, 1200, dtype=torch.int32) * 50
    (shards / "train_000.bin").write_bytes(a.to(torch.uint16).numpy().tobytes())
    (shards / "train_001.bin").write_bytes(b.to(torch.uint16).numpy().tobytes())
    tokens, vocab = load_tokens(str(shards))
    assert torch.equal(tokens, torch.cat([a, b])) and vocab == int(b.max()) + 1
    (shards / "README.txt").write_text("shards of the corpus\n")
    with pytest.raises(ValueError, match=r"mixes 2 \.bin token file\(s\) with 1 other file\(s\)"):
        load_tokens(str(shards))


def test_an_unreadable_data_file_is_a_one_line_error(tmp_path):
    """A PermissionError from read_bytes was a traceback and exit 1. (The suite runs as root, who
    reads any file: a read that fails as a directory's does stands in for it.)"""
    from engine.data import _read_token_file

    gone = tmp_path / "tokens.bin"
    gone.mkdir()
    with pytest.raises(ValueError, match=r"--data .*tokens\.bin: cannot read it: Is a directory"):
        _read_token_file(gone, str(gone))
