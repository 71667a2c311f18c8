"""The command line: the README's commands exist, and `predict` streams from the demo model."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import make_image


def test_predict_on_the_demo_model_streams_and_says_random_weights(tmp_path):
    img = tmp_path / "x.png"
    make_image(120, 80).save(img)
    out = subprocess.run([sys.executable, "-m", "edgevl.cli", "predict", "--image", str(img), "--max-tokens",
                          "12", "--seed", "3", "Describe this picture."], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "RANDOM WEIGHTS" in out.stderr
    assert re.search(r"12 answer tokens", out.stderr)
    assert len(out.stdout.split()) >= 3


def test_predict_refuses_a_non_image_cleanly(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"definitely not a png")
    out = subprocess.run([sys.executable, "-m", "edgevl.cli", "predict", "--image", str(bad), "hi"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "cannot decode image" in out.stderr


def test_make_model_and_export_commands(tmp_path):
    ck, ox = tmp_path / "ck", tmp_path / "onnx"
    for args in (["make-model", "--size", "tiny", str(ck)], ["export", str(ck), str(ox)]):
        out = subprocess.run([sys.executable, "-m", "edgevl.cli", *args], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
    assert (ck / "model.safetensors").is_file() and (ck / "tokenizer.json").is_file()
    assert (ox / "vision_embed.onnx").is_file() and (ox / "vision_merger.onnx").is_file()
    assert (ox / "decoder.onnx").is_file() and not (ox / "vision.onnx").exists()  # the tower is stored once
    assert (ox / "edgevl_manifest.json").is_file()


def test_make_clip_then_predict_about_it(tmp_path):
    clip = tmp_path / "clip.mp4"
    made = subprocess.run([sys.executable, "-m", "edgevl.cli", "make-clip", str(clip), "--seconds", "2",
                           "--size", "128"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    out = subprocess.run([sys.executable, "-m", "edgevl.cli", "predict", "--video", str(clip), "--max-tokens", "6",
                          "--seed", "1", "What moves?"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "4 frames sampled" in out.stderr and re.search(r"prompt \(\d+ of them video\)", out.stderr)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    out = subprocess.run([sys.executable, "-m", "edgevl.cli", "predict", "--video", str(bad), "hi"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "cannot read the video" in out.stderr


def test_make_model_thinking_then_predict_prints_the_thought_apart(tmp_path, thinking_checkpoint):
    ck = tmp_path / "thinking"
    out = subprocess.run([sys.executable, "-m", "edgevl.cli", "make-model", "--size", "tiny", "--variant", "thinking",
                          str(ck)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "Thinking" in out.stdout, out.stderr
    assert (ck / "chat_template.json").read_text() == (thinking_checkpoint / "chat_template.json").read_text()
    out = subprocess.run([sys.executable, "-m", "edgevl.cli", "predict", "--model", str(thinking_checkpoint),
                          "--max-tokens", "12", "--reasoning-budget", "4", "--temperature", "0", "Why?"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(4 of them thinking)" in out.stderr and out.stdout.strip() and "think>" not in out.stdout
