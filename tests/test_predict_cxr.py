"""``ehr-diffusers predict-cxr``: the next chest X-ray from a saved tiny EHRXDiff pipeline, in process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from ehr_diffusers import EHRXDiffPipeline
from ehr_diffusers.cli import main
from test_ehrxdiff_pipeline import EVENT_DIM, IMAGE_SIZE, _tiny_components

EVENTS = "furosemide 40 mg IV, time -20.0 h\ncreatinine 2.1 mg/dL (high), time -3.5 h\n\nchest tube placed, time -1 h\n"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny pipeline saved with every component, the event embedder (and its tokenizer) included."""
    folder = tmp_path_factory.mktemp("predict-cxr") / "model"
    EHRXDiffPipeline(**_tiny_components()).save_pretrained(folder)
    return folder


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """A previous image of another size than the model's (48 x 40, RGB), a text and a .npy events file."""
    rng = np.random.default_rng(0)
    prev = tmp_path / "prev.png"
    PIL.Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(prev)
    text = tmp_path / "events.txt"
    text.write_text(EVENTS, encoding="utf-8")
    array = tmp_path / "events.npy"
    embeddings = rng.standard_normal((3, EVENT_DIM)).astype(np.float32)
    np.save(array, embeddings)
    archive = tmp_path / "events.npz"
    np.savez(archive, event_embeddings=embeddings, event_hours=np.array([-30.0, -12.5, -1.0], np.float32))
    return {"prev": prev, "text": text, "npy": array, "npz": archive, "dir": tmp_path}


def _run(model: Path, prev: Path, events: Path, out: Path, *extra: str) -> int:
    return main(["predict-cxr", "--model", str(model), "--prev", str(prev), "--events", str(events), "--out",
                 str(out), "--steps", "2", *extra])


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("events", ["text", "npy", "npz"])
def test_predicts_an_image_of_the_model_size(model, inputs, events, capsys) -> None:
    out = inputs["dir"] / "next.png"
    assert _run(model, inputs["prev"], inputs[events], out, "--guidance-scale", "2") == 0
    assert f"predicted image written to {out} (32 x 32, 2 DDIM steps, guidance 2, seed 0)" in capsys.readouterr().out
    with PIL.Image.open(out) as image:
        assert image.format == "PNG" and image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "L"
    # the same seed gives the same file; another seed another image
    again = inputs["dir"] / "again.png"
    assert _run(model, inputs["prev"], inputs[events], again, "--guidance-scale", "2") == 0
    assert again.read_bytes() == out.read_bytes()
    other = inputs["dir"] / "other.png"
    assert _run(model, inputs["prev"], inputs[events], other, "--guidance-scale", "2", "--seed", "1") == 0
    assert other.read_bytes() != out.read_bytes()


def test_matches_the_pipeline_and_overwrites_on_request(model, inputs) -> None:
    out = inputs["dir"] / "next.jpg"
    assert _run(model, inputs["prev"], inputs["text"], out, "--seed", "3", "--eta", "0") == 0
    with PIL.Image.open(out) as image:
        assert image.format == "JPEG" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
    png = inputs["dir"] / "next.png"
    assert _run(model, inputs["prev"], inputs["text"], png, "--seed", "3", "--eta", "0") == 0
    import torch

    pipe = EHRXDiffPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    with PIL.Image.open(inputs["prev"]) as previous:
        expected = pipe(previous.convert("L"), events=[line for line in EVENTS.splitlines() if line],
                        num_inference_steps=2, eta=0.0, generator=torch.Generator().manual_seed(3)).images[0]
    with PIL.Image.open(png) as image:
        np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
    before = png.read_bytes()
    assert _run(model, inputs["prev"], inputs["text"], png, "--seed", "4", "--overwrite") == 0
    assert png.read_bytes() != before


def test_an_empty_events_file_predicts_from_the_previous_image_alone(model, inputs) -> None:
    empty = inputs["dir"] / "none.txt"
    empty.write_text("\n", encoding="utf-8")
    out = inputs["dir"] / "next.png"
    assert _run(model, inputs["prev"], empty, out) == 0
    with PIL.Image.open(out) as image:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("corrupt image", "--prev"),
        ("missing prev", "--prev"),
        ("non-utf8 events", "--events"),
        ("npy of the wrong dim", "--events"),
        ("guidance nan", "--guidance-scale"),
        ("existing out", "--out"),
        ("txt out", "--out"),
    ],
)
def test_bad_inputs_exit_2_naming_the_argument(model, inputs, case, named, capsys) -> None:
    folder = inputs["dir"]
    prev, events, out, extra = inputs["prev"], inputs["text"], folder / "next.png", []
    if case == "corrupt image":
        prev = folder / "corrupt.png"
        prev.write_bytes(b"\x89PNG\r\n\x1a\nnot really an image")
    elif case == "missing prev":
        prev = folder / "no-such.png"
    elif case == "non-utf8 events":
        events = folder / "latin1.txt"
        events.write_bytes("pleural effusion, time -2.0 h\nbilan hépatique\n".encode("latin-1"))
    elif case == "npy of the wrong dim":
        events = folder / "wrong.npy"
        np.save(events, np.zeros((2, EVENT_DIM + 1), np.float32))
    elif case == "guidance nan":
        extra = ["--guidance-scale", "nan"]
    elif case == "existing out":
        out.write_bytes(b"keep me")
    elif case == "txt out":
        out = folder / "next.txt"
    before = _files(folder)
    capsys.readouterr()
    assert _run(model, prev, events, out, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("ehr-diffusers predict-cxr: error: ") and named in err[-1], err
    assert _files(folder) == before  # nothing written, no temporary file left
    if case == "existing out":
        assert out.read_bytes() == b"keep me"
    else:
        assert not out.exists()


def test_npz_event_hours_reach_the_pipeline(model, inputs) -> None:
    """The .npz's hours are the events' times: the prediction equals the pipeline's with those hours, and differs from
    the same embeddings without times (.npy)."""
    from_npz, from_npy = inputs["dir"] / "npz.png", inputs["dir"] / "npy.png"
    assert _run(model, inputs["prev"], inputs["npz"], from_npz) == 0
    assert _run(model, inputs["prev"], inputs["npy"], from_npy) == 0
    assert from_npz.read_bytes() != from_npy.read_bytes()
