"""Folders as training data: size and channels inferred from the images, crops and flips,
captions and class sub-folders reaching the conditioner and the denoiser, the streaming loader
(per-draw reads, batches a pure function of the step, exact resume), and every bad input
answered with one line or a counted skip."""

import numpy as np
import pytest
import torch
from cliutil import assert_clean_error, run_cli
from coreonly import ENV, core_only
from fixture_tiny_model import TinyConfig, TinyDenoiser, UniformVP
from PIL import Image

from diffplug import Conditioner, streaming
from diffplug import folders as folders_module
from diffplug.checkpoint import load_tensors, read_metadata
from diffplug.data import open_data
from diffplug.errors import UserError
from diffplug.folders import infer_shape, read_image, scan_folder
from diffplug.streaming import FolderData, step_draws
from diffplug.training import TrainConfig, Trainer, train


@pytest.fixture(autouse=True)
def _core_only():
    with core_only():
        yield


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


def _solid(path, value, size=(8, 8), rgb=True):
    """A flat image whose every pixel is ``value`` (a grey level, or an RGB triple)."""
    w, h = size
    shape = (h, w, 3) if rgb else (h, w)
    _save(path, np.broadcast_to(np.asarray(value, dtype=np.uint8), shape))


def _colours(n):
    """n distinct RGB values, one per image, so a batch row says which image it is."""
    return [(20 * k + 10, 200 - 15 * k, (37 * k) % 256) for k in range(n)]


def _index_of(x0_row, colours):
    """Which image a clean batch row (C, S, S) in [-1, 1] is, by its mean colour."""
    mean = ((x0_row.mean(dim=(1, 2)) + 1) * 127.5).tolist()
    return min(
        range(len(colours)), key=lambda k: sum((a - b) ** 2 for a, b in zip(mean, colours[k]))
    )


def tiny(channels=3, size=8, seed=0, **config):
    torch.manual_seed(seed)
    return TinyDenoiser(TinyConfig(channels=channels, size=size, widths=[8], **config))


class Recording(Conditioner):
    """Records each batch's images, labels and captions; its condition is unused."""

    kind = None

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, inputs):
        return None

    def from_data(self, x0, generator, labels=None, captions=None):
        self.seen.append((x0.clone(), None if labels is None else labels.clone(), captions))
        return None


# -- size and channels ------------------------------------------------------------------------


def test_size_and_channels_are_inferred_from_rgb_and_greyscale_folders_of_odd_sizes(tmp_path):
    rgb = tmp_path / "rgb"
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate([(21, 21), (21, 30), (33, 21), (13, 17)]):  # short sides 21 x3
        _save(rgb / f"{k}.png", rng.integers(0, 255, (h, w, 3)))
    data = FolderData(scan_folder(rgb))
    assert (data.size, data.channels, data.inferred) == (21, 3, ["size", "channels"])
    assert data.image(1).shape == (3, 21, 21)
    # greyscale: L files, and RGB files whose pixels are grey (no colour anywhere)
    grey = tmp_path / "grey"
    _save(grey / "a.png", rng.integers(0, 255, (11, 15)))
    g = rng.integers(0, 255, (15, 11))
    _save(grey / "b.png", np.stack([g, g, g], axis=-1))
    _save(grey / "c.png", rng.integers(0, 255, (19, 19)))
    data = FolderData(scan_folder(grey))
    assert (data.size, data.channels) == (11, 1)  # 11 twice, 19 once
    assert data.image(2).shape == (1, 11, 11)
    # one coloured image makes the folder RGB; ties in the side go to the larger
    _solid(grey / "d.png", (255, 0, 0), size=(19, 25))
    assert infer_shape(scan_folder(grey), None, None) == (19, 3)
    assert infer_shape(scan_folder(grey), 8, 1) == (8, 1)  # --size and --channels win


def test_train_cli_prints_and_records_the_inferred_shape(tmp_path):
    folder = tmp_path / "pics"
    for k, colour in enumerate(_colours(5)):
        _solid(folder / f"{k}.png", colour, size=(12, 12 + k))
    out = tmp_path / "run"
    args = ("train", "--method", "uniform-vp", "--data", str(folder), "--widths", "8",
            "--steps", "2", "--batch-size", "4", "--workers", "0", "-q", "--out", str(out))  # fmt: skip
    result = run_cli(*args, env=ENV)
    assert result.code == 0, result.err
    lines = [line for line in result.err.splitlines() if line.startswith("diffplug: data ")]
    assert len(lines) == 1 and "5 images -> 12x12 RGB (size and channels inferred" in lines[0]
    meta = read_metadata(out / "model.safetensors")
    assert (meta["config"]["size"], meta["config"]["channels"]) == (12, 3)
    record = meta["extra"]["data"]
    assert (record["size"], record["channels"], record["images"]) == (12, 3, 5)
    assert record["inferred"] == ["size", "channels"] and record["folder"] == str(folder)
    assert (record["crop"], record["hflip"]) == ("centre", False)
    # forced: greyscale at 8 px
    result = run_cli(*args[:-1], str(tmp_path / "grey"), "--size", "8", "--channels", "1",
                     env=ENV)  # fmt: skip
    assert result.code == 0, result.err
    meta = read_metadata(tmp_path / "grey" / "model.safetensors")
    assert (meta["config"]["size"], meta["config"]["channels"]) == (8, 1)
    assert meta["extra"]["data"]["inferred"] == []


# -- crops and flips --------------------------------------------------------------------------


def test_read_image_crops_the_short_side_centred_or_at_the_offset_and_flips(tmp_path):
    columns = np.tile(np.arange(6, dtype=np.uint8) * 40, (2, 1))  # 6 wide, 2 high: 0,40,...,200
    _save(tmp_path / "a.png", columns)
    centre = read_image(tmp_path / "a.png", 2, 1)
    assert centre[0].tolist() == [[80, 120], [80, 120]]  # columns 2 and 3
    assert read_image(tmp_path / "a.png", 2, 1, offset=(0.0, 0.5))[0, 0].tolist() == [0, 40]
    assert read_image(tmp_path / "a.png", 2, 1, offset=(0.999, 0.5))[0, 0].tolist() == [160, 200]
    assert read_image(tmp_path / "a.png", 2, 1, flip=True)[0, 0].tolist() == [120, 80]
    # a bigger image: the square crop is resized to the model's side
    _save(tmp_path / "b.png", np.full((40, 60, 3), 90))
    assert torch.equal(
        read_image(tmp_path / "b.png", 8, 3), torch.full((3, 8, 8), 90, dtype=torch.uint8)
    )


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (255, 0, 0, 255)  # top half opaque red, bottom half fully transparent black
    _save(tmp_path / "a.png", rgba, mode="RGBA")
    image = read_image(tmp_path / "a.png", 4, 3)
    assert image[:, 0, 0].tolist() == [255, 0, 0] and image[:, 3, 0].tolist() == [255, 255, 255]


def test_random_crops_and_flips_are_drawn_per_step_and_only_when_asked(tmp_path):
    for k, colour in enumerate(_colours(4)):
        _solid(tmp_path / f"{k}.png", colour, size=(8, 12))
    plain = FolderData(scan_folder(tmp_path))
    draws = step_draws(plain, 64, seed=0, rank=0, step=3)
    assert all(d.offset is None and not d.flip for d in draws)
    aug = FolderData(scan_folder(tmp_path), crop="random", hflip=True)
    draws = step_draws(aug, 64, seed=0, rank=0, step=3)
    assert [d.index for d in draws] == [d.index for d in step_draws(plain, 64, 0, 0, 3)]
    assert 16 < sum(d.flip for d in draws) < 48  # about half
    tops = {int(d.offset[1] * 5) for d in draws}  # 12 - 8 + 1 = 5 offsets along the height
    assert tops == {0, 1, 2, 3, 4}


# -- the streaming loader ---------------------------------------------------------------------


def test_batches_are_a_pure_function_of_seed_rank_and_step(tmp_path):
    for k, colour in enumerate(_colours(10)):
        _solid(tmp_path / f"{k}.png", colour)
    data = FolderData(scan_folder(tmp_path), crop="random", hflip=True, workers=0)
    same = step_draws(data, 16, seed=1, rank=0, step=7)
    assert same == step_draws(data, 16, seed=1, rank=0, step=7)
    for other in ((2, 0, 7), (1, 1, 7), (1, 0, 8)):
        assert step_draws(data, 16, *other) != same
    # a stream started at step 2 gives the batch a stream that walked from step 0 gives
    walked = streaming.Stream(data, 16, 1, 0, torch.device("cpu"))
    for step in range(3):
        images, _, _ = walked.batch(step)
    jumped = streaming.Stream(data, 16, 1, 0, torch.device("cpu"))
    assert torch.equal(jumped.batch(2)[0], images)
    # and workers read what the main process reads
    data.workers = 2
    threaded = streaming.Stream(data, 16, 1, 0, torch.device("cpu"))
    assert torch.equal(threaded.batch(2)[0], images)
    threaded.close()


def test_images_are_read_per_draw_not_held_in_memory(tmp_path, monkeypatch):
    for k, colour in enumerate(_colours(6)):
        _solid(tmp_path / f"{k}.png", colour)
    data = FolderData(scan_folder(tmp_path), workers=0)
    reads = []
    real = streaming.read_image
    monkeypatch.setattr(
        streaming, "read_image", lambda *a, **k: reads.append(a[0]) or real(*a, **k)
    )
    trainer = Trainer(tiny(), UniformVP(), data, TrainConfig(batch_size=5))
    assert trainer.images is None  # nothing loaded up front
    trainer.train_step()
    trainer.train_step()
    assert len(reads) == 10  # 5 reads per step
    trainer.close()


def test_streamed_training_resumes_exactly(tmp_path):
    folder = tmp_path / "pics"
    rng = np.random.default_rng(1)
    for k in range(9):
        _save(folder / f"{k}.png", rng.integers(0, 255, (10, 13, 3)))
    config = TrainConfig(steps=8, batch_size=4, warmup=2, checkpoint_every=100)

    def data(workers):
        return open_data(str(folder), 8, None, crop="random", hflip=True, workers=workers)

    train(tiny(), UniformVP(), data(0), config, tmp_path / "whole", progress=False)
    train(tiny(), UniformVP(), data(2), config, tmp_path / "half", progress=False, stop_after=4)
    train(tiny(seed=5), UniformVP(), data(1), config, tmp_path / "half", progress=False,
          resume=True)  # fmt: skip
    for name in ("model.safetensors", "state-00000008/raw.safetensors",
                 "state-00000008/ema.safetensors", "state-00000008/optimizer.safetensors"):  # fmt: skip
        a, b = load_tensors(tmp_path / "whole" / name), load_tensors(tmp_path / "half" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the same run without its augmentation is another run: refused on resume
    plain = open_data(str(folder), 8, None, workers=0)
    with pytest.raises(UserError, match="data crop 'centre'"):
        train(tiny(), UniformVP(), plain, TrainConfig(steps=12, batch_size=4, warmup=2),
              tmp_path / "half", progress=False, resume=True)  # fmt: skip


def test_a_file_that_vanishes_during_training_is_one_clear_error(tmp_path):
    for k, colour in enumerate(_colours(3)):
        _solid(tmp_path / "pics" / f"{k}.png", colour)
    data = open_data(str(tmp_path / "pics"), workers=0)
    (tmp_path / "pics" / "1.png").unlink()
    with pytest.raises(UserError, match=r"cannot read a training image: .*1\.png"):
        train(tiny(), UniformVP(), data, TrainConfig(steps=5, batch_size=8), tmp_path / "run",
              progress=False)  # fmt: skip


# -- captions and classes ---------------------------------------------------------------------


def test_captions_beside_the_images_reach_the_conditioner(tmp_path):
    colours = _colours(4)
    for k, colour in enumerate(colours):
        _solid(tmp_path / f"img{k}.png", colour)
        (tmp_path / f"img{k}.txt").write_text(f"picture {k}\n\n  a photo of {k}  \n")
    data = open_data(str(tmp_path), captions=True, workers=0)
    assert data.captions[2] == ["picture 2", "a photo of 2"]
    conditioner = Recording()
    trainer = Trainer(
        tiny(), UniformVP(), data, TrainConfig(batch_size=32), conditioner=conditioner
    )
    trainer.batch()
    trainer.step = 1
    trainer.batch()
    phrasings = set()
    for x0, _, captions in conditioner.seen:
        assert len(captions) == 32
        for row, caption in zip(x0, captions):
            assert caption.split()[-1] == str(_index_of(row, colours))  # its own image's
            phrasings.add(caption.split()[0])
    assert phrasings == {"picture", "a"}  # both lines are drawn
    # without a conditioner that reads captions, the .txt files are not even read
    assert open_data(str(tmp_path), workers=0).captions is None


def test_class_sub_folders_become_labels_the_trainer_hands_on(tmp_path):
    colours = _colours(5)
    layout = {"zebra": [0, 1], "apple": [2], "mango": [3, 4]}  # sorted: apple 0, mango 1, zebra 2
    for name, ks in layout.items():
        for k in ks:
            _solid(tmp_path / name / f"{k}.png", colours[k])
    data = open_data(str(tmp_path), labels_from_folders=True, workers=0)
    assert data.classes == ("apple", "mango", "zebra")
    expected = {k: ["apple", "mango", "zebra"].index(n) for n, ks in layout.items() for k in ks}
    conditioner = Recording()
    trainer = Trainer(
        tiny(), UniformVP(), data, TrainConfig(batch_size=40), conditioner=conditioner
    )
    trainer.batch()
    x0, labels, _ = conditioner.seen[0]
    assert [expected[_index_of(row, colours)] for row in x0] == labels.tolist()
    # a class-conditional denoiser gets them as its condition (dropped ones: the null label)

    class ClassTiny(TinyDenoiser):
        null_label = 3

    torch.manual_seed(0)
    model = ClassTiny(TinyConfig(channels=3, size=8, widths=[8], conditioning="class"))
    trainer = Trainer(model, UniformVP(), data, TrainConfig(batch_size=40, cond_dropout=0.25))
    x0, cond = trainer.batch()
    got = cond["labels"].tolist()
    kept = [(expected[_index_of(r, colours)], g) for r, g in zip(x0, got) if g != 3]
    assert all(a == b for a, b in kept) and 20 < len(kept) < 40


def test_labels_from_folders_train_a_class_conditional_unet_through_the_cli(tmp_path):
    colours = _colours(4)
    for k, name in enumerate(["cat", "cat", "dog", "dog"]):
        _solid(tmp_path / "pets" / name / f"{k}.png", colours[k])
    out = tmp_path / "run"
    result = run_cli("train", "--method", "ddpm", "--data", str(tmp_path / "pets"),
                     "--labels-from-folders", "--width", "8", "--heads", "1", "--steps", "2",
                     "--batch-size", "4", "--workers", "0", "-q", "--out", str(out))  # fmt: skip
    assert result.code == 0, result.err
    assert "2 classes from sub-folders" in result.err
    meta = read_metadata(out / "model.safetensors")
    assert meta["config"]["num_classes"] == 2 and meta["config"]["conditioning"] == "class"
    assert meta["extra"]["data"]["classes"] == ["cat", "dog"]


# -- bad input --------------------------------------------------------------------------------


def test_an_empty_caption_file_skips_its_image_with_a_count(tmp_path):
    for k in range(3):
        _solid(tmp_path / f"{k}.png", _colours(3)[k])
        (tmp_path / f"{k}.txt").write_text("a caption\n" if k else "\n   \n")
    scan = scan_folder(tmp_path, captions=True)
    assert scan.files == ("1.png", "2.png")
    assert scan.note() == "1 images with an empty caption file, skipped (0.txt)"


def test_a_caption_file_without_an_image_and_other_files_are_ignored_and_counted(tmp_path):
    _solid(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "a.txt").write_text("the image\n")
    (tmp_path / "orphan.txt").write_text("no image has this name\n")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / ".DS_Store").write_bytes(b"\0")  # hidden: passed over silently
    scan = scan_folder(tmp_path, captions=True)
    assert scan.files == ("a.png",) and scan.captions == (("the image",),)
    note = scan.note()
    assert "1 caption files without an image, ignored (orphan.txt)" in note
    assert "1 files that are not images, ignored (notes.pdf)" in note and "DS_Store" not in note
    # images without a caption in a captioned folder are skipped, and said
    _solid(tmp_path / "b.png", (3, 2, 1))
    assert (
        "1 images without a caption file, skipped (b.png)"
        in scan_folder(tmp_path, captions=True).note()
    )


def test_images_of_mixed_modes_are_converted_and_counted(tmp_path):
    _solid(tmp_path / "rgb.png", (200, 10, 10))
    _solid(tmp_path / "grey.png", 120, rgb=False)
    rgba = np.zeros((8, 8, 4), np.uint8)
    _save(tmp_path / "clear.png", rgba, mode="RGBA")
    Image.new("P", (8, 8), 0).save(tmp_path / "palette.png")
    data = FolderData(scan_folder(tmp_path))
    assert data.channels == 3
    assert "converted 1 L, 1 P, 1 RGBA image(s) to RGB" in data.describe()
    images = {name: data.image(data.scan.files.index(name)) for name in data.scan.files}
    assert images["grey.png"].shape == (3, 8, 8) and int(images["grey.png"][0, 0, 0]) == 120
    assert images["clear.png"].min() == 255  # transparent: white


def test_a_huge_image_is_skipped_with_a_count(tmp_path, monkeypatch):
    for k in range(2):
        _solid(tmp_path / f"small{k}.png", _colours(2)[k])
    _solid(tmp_path / "huge.png", (9, 9, 9), size=(64, 64))
    monkeypatch.setattr(folders_module, "MAX_PIXELS", 1000)
    scan = scan_folder(tmp_path)
    assert scan.files == ("small0.png", "small1.png")
    assert scan.note() == "1 images over 1000 pixels, skipped (huge.png)"
    # PIL's own decompression-bomb guard is the same skip
    monkeypatch.setattr(folders_module, "MAX_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert "huge.png" in scan_folder(tmp_path).note()


def test_corrupt_images_are_skipped_with_a_count(tmp_path):
    _solid(tmp_path / "good.png", (5, 6, 7))
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    _solid(tmp_path / "cut.png", (1, 2, 3), size=(64, 64))
    whole = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])  # truncated mid-data
    scan = scan_folder(tmp_path)
    assert scan.files == ("good.png",)
    assert scan.note() == "2 unreadable images, skipped (cut.png, junk.png)"


def test_folders_with_nothing_usable_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no images in"):
        scan_folder(tmp_path)
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(UserError, match="1 other file"):
        scan_folder(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(
        UserError, match=r"no usable images in .*; 1 unreadable images, skipped \(bad.png\)"
    ):
        scan_folder(tmp_path)
    _solid(tmp_path / "top.png", (1, 1, 1))
    with pytest.raises(UserError, match="not in a class sub-folder"):
        scan_folder(tmp_path, labels_from_folders=True)
    with pytest.raises(UserError, match="does not exist"):
        scan_folder(tmp_path / "missing")


def test_bad_folders_and_options_exit_2_through_the_cli(tmp_path):
    base = ("train", "--method", "uniform-vp", "--widths", "8", "--steps", "2", "-q")
    (tmp_path / "empty").mkdir()
    result = run_cli(
        *base, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "a"), env=ENV
    )
    assert_clean_error(result, "no images in")
    assert len(result.err.strip().splitlines()) == 1
    result = run_cli(*base, "--hflip", "--out", str(tmp_path / "b"), env=ENV)  # digits: memory
    assert_clean_error(result, "--hflip: for image folders")
    _solid(tmp_path / "pets" / "cat" / "0.png", (1, 2, 3))
    _solid(tmp_path / "pets" / "dog" / "1.png", (3, 2, 1))
    result = run_cli("train", "--method", "ddpm", "--data", str(tmp_path / "pets"), "-q",
                     "--labels-from-folders", "--num-classes", "1", "--out", str(tmp_path / "c"))  # fmt: skip
    assert_clean_error(result, "--num-classes 1: the data has 2 classes")


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")  # a training subprocess: never beside another
def test_ctrl_c_with_loader_workers_checkpoints_and_resumes(tmp_path):
    """A fresh process reading through worker processes (which once hung on shared-memory
    handles), interrupted as a terminal does (the whole process group): one line, a
    checkpoint, and a resume that finishes."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from cliutil import FIXTURES

    for k, colour in enumerate(_colours(6)):
        _solid(tmp_path / "pics" / f"{k}.png", colour, size=(10, 12))
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(FIXTURES)}
    args = [sys.executable, "-m", "diffplug", "train", "--method", "uniform-vp", "--data",
            str(tmp_path / "pics"), "--widths", "8", "--batch-size", "4", "--workers", "2",
            "--checkpoint-every", "100000", "--out", str(tmp_path / "run")]  # fmt: skip
    log = tmp_path / "log.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([*args, "--steps", "100000"], env=env, stdout=err, stderr=err,
                                start_new_session=True)  # fmt: skip
        deadline = time.time() + 600
        while time.time() < deadline and not re.search(r"\| [1-9]\d*/", log.read_text()):
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=300) == 130, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text and "interrupted; checkpoint at step" in text, text
    step = int(re.search(r"checkpoint at step (\d+)", text).group(1))
    done = subprocess.run([*args, "--steps", str(step + 3), "--resume", "-q"], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "latest").read_text() == f"state-{step + 3:08d}"
