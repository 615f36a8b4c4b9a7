"""The pieces of the resume key: the checkpoint fingerprint, the torn-tail repair, and the answers files of
runs with different process counts merged."""

from __future__ import annotations

import json
import os
import time

import pytest

from tlvr_cli.eval import resume
from tlvr_cli.eval.answers import merge_answers, merge_speeds, read_answers, truncate_torn_tail


def test_fingerprint_covers_every_byte_and_reuses_recorded_digests(tmp_path, monkeypatch):
    monkeypatch.setenv("TLVR_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(resume, "HASH_CHUNK", 1000)  # several chunks per file, hashed in parallel
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    weights = bytearray(os.urandom(4500))
    (ckpt / "model.safetensors").write_bytes(weights)
    (ckpt / "README.md").write_text("not part of the fingerprint")
    digest, files = resume.weights_fingerprint(str(ckpt))
    assert sorted(files) == ["config.json", "model.safetensors"]
    (ckpt / "README.md").write_text("edited")
    (ckpt / "model.safetensors").write_bytes(weights)  # rewritten unchanged: new mtime, same digest
    assert resume.weights_fingerprint(str(ckpt))[0] == digest
    weights[3333] ^= 1  # one bit in the fourth chunk
    (ckpt / "model.safetensors").write_bytes(weights)
    changed, changed_files = resume.weights_fingerprint(str(ckpt), known=files)
    assert changed != digest and changed_files["config.json"] == files["config.json"]
    # unchanged sizes and mtimes: the recorded digests are used, nothing is read
    monkeypatch.setattr(resume, "_chunk_digest", lambda *a: pytest.fail("read a file whose digest was recorded"))
    assert resume.weights_fingerprint(str(ckpt), known=changed_files) == (changed, changed_files)


def test_truncate_torn_tail(tmp_path):
    path = tmp_path / "answers.jsonl"
    assert truncate_torn_tail(path) == 0  # no file yet
    path.write_text('{"item_id": "a"}\n{"item_id": "b"}\n')
    assert truncate_torn_tail(path) == 0
    with path.open("a") as f:
        f.write('{"item_id": "c", "out')
    assert truncate_torn_tail(path) == len('{"item_id": "c", "out')
    assert [r["item_id"] for r in read_answers(path)] == ["a", "b"] and path.read_text().endswith("}\n")
    path.write_text('{"item_id": "only", "torn')
    assert truncate_torn_tail(path) > 0 and path.read_bytes() == b""


def test_fingerprints_are_remembered_across_output_directories(tmp_path, monkeypatch):
    # evaluating one checkpoint on several benchmarks (a new directory each, no provenance to reuse)
    # hashes its files once; a file changed since is hashed again
    monkeypatch.setenv("TLVR_DATA", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(os.urandom(3000))
    old = time.time_ns() - 10**10  # written 10 s ago: past the racy window
    for f in ckpt.iterdir():
        os.utime(f, ns=(old, old))
    real = resume._chunk_digest
    reads = []
    monkeypatch.setattr(resume, "_chunk_digest", lambda path, start: reads.append(path.name) or real(path, start))
    monkeypatch.setattr(resume, "RACY_S", 0.0)  # ctime is "now" after utime: accept it here
    digest, files = resume.weights_fingerprint(str(ckpt))
    assert sorted(reads) == ["config.json", "model.safetensors"]
    reads.clear()
    assert resume.weights_fingerprint(str(ckpt)) == (digest, files) and reads == []
    weights.write_bytes(os.urandom(3000))  # same size, new content
    changed, _ = resume.weights_fingerprint(str(ckpt))
    assert changed != digest and reads == ["model.safetensors"]
    # a file written just now is hashed but not remembered: a second write in the same tick could keep its stat
    monkeypatch.setattr(resume, "RACY_S", 2.0)
    weights.write_bytes(os.urandom(3000))
    reads.clear()
    resume.weights_fingerprint(str(ckpt))
    resume.weights_fingerprint(str(ckpt))
    assert reads == ["model.safetensors", "model.safetensors"]
    # an unreadable cache is only a cache
    (tmp_path / "cache" / resume.DIGEST_CACHE).write_text("{not json")
    assert resume.weights_fingerprint(str(ckpt))[0] == resume.weights_fingerprint(str(ckpt))[0]


def test_answers_of_one_and_of_several_processes_merge_in_benchmark_order(tmp_path):
    def write(name, ids, torn=False):
        text = "".join(json.dumps({"item_id": i, "output": f"{name}:{i}"}) + "\n" for i in ids)
        (tmp_path / name).write_text(text + ('{"item_id": "z", "outp' if torn else ""))

    write("answers.jsonl", ["a", "d"])  # a one-process run, stopped
    write("answers.rank0.jsonl", ["b", "d"])  # then two processes of another run (d answered twice: one row)
    write("answers.rank1.jsonl", ["c"], torn=True)  # one of them killed mid-write
    merged = merge_answers(tmp_path, ["a", "b", "c", "d", "e"])
    assert [(r["item_id"], r["output"]) for r in merged] == [
        ("a", "answers.jsonl:a"), ("b", "answers.rank0.jsonl:b"), ("c", "answers.rank1.jsonl:c"),
        ("d", "answers.jsonl:d")]
    assert read_answers(tmp_path / "answers.jsonl") == merged


def test_speeds_of_the_processes_merge_into_one_record():
    def speed(questions, tokens, seconds, device):
        return {"questions": questions, "skipped": 1, "generated_tokens": tokens, "prompt_positions": 100,
                "prefilled_positions": 60, "already_answered": 2, "generate_s": seconds, "first_answer_s": seconds / 4,
                "tokens_per_s": tokens / seconds, "questions_per_s": questions / seconds, "wall_s": seconds + 3,
                "load_s": 1.5, "engine_max_batch": 64, "device": device}

    merged = merge_speeds([speed(10, 3000, 2.0, "cuda:0"), speed(6, 1000, 4.0, "cuda:1")])
    assert merged == {"questions": 16, "skipped": 2, "generated_tokens": 4000, "prompt_positions": 200,
                      "prefilled_positions": 120, "already_answered": 4, "generate_s": 4.0, "first_answer_s": 0.5,
                      "tokens_per_s": 1000.0, "questions_per_s": 4.0, "wall_s": 7.0, "load_s": 1.5,
                      "engine_max_batch": 64, "processes": 2, "devices": ["cuda:0", "cuda:1"]}
