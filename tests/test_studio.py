"""The studio server: validation (4xx with a message), the bounded queue, jobs and downloads, CLI."""

import base64
import dataclasses
import gc
import http.client
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import ditkit.autoencoders
import ditkit.sampling
import ditkit.studio.jobs
import ditkit.studio.server
import ditkit.train
from conftest import make_tiny_config, save_tiny_autoencoder_kl, save_tiny_bert
from ditkit.autoencoders import resolve_autoencoder
from ditkit.checkpoint import save_checkpoint
from ditkit.cli import build_parser, main
from ditkit.config import AutoencoderConfig, Config, ConfigError, DataConfig, ModelConfig, SampleConfig, TextConfig
from ditkit.inpainting import load_image, load_mask
from ditkit.samplers import SAMPLERS
from ditkit.sampling import generate
from ditkit.studio import Job, Limits, Studio, StudioError, make_server
from ditkit.studio.server import host_of, is_loopback
from ditkit.train import build_model


def tiny_studio(num_classes: int = 4, limits: Limits | None = None) -> Studio:
    cfg = make_tiny_config("unused")
    cfg.model.num_classes = num_classes
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():  # non-zero output so the pictures are not flat
        model.final_layer.linear.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return Studio(model, cfg, name="tiny", limits=limits)


class Client:
    """Talks JSON to a studio server running on a thread."""

    def __init__(self, studio: Studio) -> None:
        self.studio = studio
        self.server = make_server(studio, "127.0.0.1", 0)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def request(self, path: str, body=None, raw: bytes | None = None, content_type: str = "application/json"):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method="POST" if data is not None else "GET")
        req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, resp.headers.get("Content-Type"), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Content-Type"), err.read()

    def json(self, path: str, body=None, raw=None, content_type: str = "application/json"):
        status, ctype, payload = self.request(path, body, raw, content_type)
        assert ctype == "application/json", (status, ctype, payload[:200])
        return status, json.loads(payload)

    def run(self, body) -> dict:
        status, job = self.json("/api/jobs", body)
        assert status == 202, job
        self.studio.wait(self.studio.get(job["id"]), timeout=120)
        return self.json(f"/api/jobs/{job['id']}")[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def client():
    c = Client(tiny_studio())
    yield c
    c.close()
    c.studio.close()


def png_data_url(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_page_and_info(client):
    status, ctype, page = client.request("/")
    assert status == 200 and ctype.startswith("text/html") and b"/static/app.js" in page
    status, ctype, js = client.request("/static/app.js")
    assert status == 200 and b"/api/jobs" in js
    assert b"http" not in js.replace(b"https://", b"").replace(b"http://", b"")  # no CDN
    status, info = client.json("/api/info")
    assert status == 200 and info["conditioning"] == "class" and info["num_classes"] == 4
    assert info["samplers"] == list(SAMPLERS) and "ddim" in info["samplers"]
    assert (info["height"], info["width"], info["channels"], info["latent"]) == (8, 8, 1, None)
    assert client.json("/api/nope")[0] == 404 and client.json("/static/../server.py")[0] == 404


BAD_REQUESTS = [
    ({"labels": [0], "steps": 5000}, "steps must be between 1 and 1000"),
    ({"labels": [0], "steps": 0}, "steps must be between 1 and 1000"),
    ({"labels": [0], "steps": True}, "steps must be a whole number"),
    ({"labels": [0] * 65}, "at most 64 images"),
    ({"labels": [4]}, "class labels must be whole numbers in 0..3"),
    ({"labels": ["cat"]}, "class labels must be whole numbers in 0..3"),
    ({"labels": []}, "labels must be a non-empty list"),
    ({"labels": [0], "sampler": "magic"}, "sampler must be one of ddim, ddpm, euler, heun, dpmpp_2m"),
    ({"labels": [0], "cfg_scale": 100}, "cfg_scale must be between 0 and 20"),
    ({"labels": [0], "cfg_scale": "strong"}, "cfg_scale must be a number"),
    ({"labels": [0], "seed": -1}, "seed must be between 0"),
    ({"labels": [0], "seed": "abc"}, "seed must be a whole number"),
    ({"labels": [0], "eta": 3}, "eta must be between 0 and 1"),
    ({"labels": [0], "colour": "red"}, "unknown field(s) colour"),
    # Numbers: JSON numbers or ASCII decimal strings only; anything else is a 400 naming the field.
    ({"labels": [0], "seed": "\u00b2"}, "seed must be a whole number, got '\u00b2'"),  # str.isdigit() says yes
    ({"labels": [0], "steps": "--5"}, "steps must be a whole number, got '--5'"),
    ({"labels": [0], "steps": "\u0663"}, "steps must be a whole number, got '\u0663'"),  # Arabic-Indic 3
    ({"labels": [0], "steps": "1_0"}, "steps must be a whole number, got '1_0'"),
    ({"labels": [0], "steps": [3]}, "steps must be a whole number, got [3]"),
    ({"labels": [0], "cfg_scale": 10**400}, "cfg_scale must be between 0 and 20, got 10000000000000000000... (401"),
    ({"labels": [0], "cfg_scale": "1e999"}, "cfg_scale must be between 0 and 20, got '1e999'"),
    ({"labels": [0], "cfg_scale": "\u0662"}, "cfg_scale must be a number, got '\u0662'"),  # float() takes it
    ({"labels": [0], "cfg_scale": float("nan")}, "cfg_scale must be a number, got nan"),
    ({"labels": [0], "eta": "infinity", "sampler": "ddim"}, "eta must be a number, got 'infinity'"),
    ({"labels": [0], "seed": 2**64}, "seed must be between 0 and 9223372036854775807, got 18446744073709551616"),
    ({"labels": [0], "preview": "false"}, "preview must be true or false, got 'false'"),
    ({"labels": [0], "preview": 0}, "preview must be true or false, got 0"),
    ({"labels": [0], "prompts": ["a cat"]}, "takes no prompts"),
    ({"labels": [0], "kind": "upscale"}, "kind must be one of sample, inpaint, outpaint"),
    ({"labels": [0], "kind": "inpaint"}, "image must be an image"),
    ({"labels": [0], "kind": "inpaint", "image": "data:image/png;base64,!!!"}, "image is not a readable image"),
    ({"labels": [0], "kind": "outpaint", "image": "aGVsbG8="}, "image is not a readable image"),
    ({"labels": [0] * 64, "steps": 1000, "sampler": "heun"}, "image-steps; the limit is 64,000"),
    ([1, 2], "must be a JSON object"),
]


@pytest.mark.parametrize("body, message", BAD_REQUESTS)
def test_bad_requests_get_400_with_a_message(client, body, message):
    status, reply = client.json("/api/jobs", body)
    assert status == 400 and message in reply["error"], reply
    assert "Traceback" not in reply["error"]


def test_numbers_as_strings_and_booleans(client):
    p = client.studio.validate({"labels": [0], "steps": " 12 ", "seed": "+7", "cfg_scale": "2.5", "preview": False})
    assert (p["steps"], p["seed"], p["cfg_scale"], p["preview"]) == (12, 7, 2.5, False)
    p = client.studio.validate({"labels": [0], "steps": 4.0, "cfg_scale": 3, "preview": None})
    assert (p["steps"], p["cfg_scale"], p["preview"]) == (4, 3.0, True)


def test_malformed_bodies_and_unknown_jobs(client):
    status, reply = client.json("/api/jobs", raw=b"{not json")
    assert status == 400 and "not valid JSON" in reply["error"]
    # json.loads raises ValueError (not JSONDecodeError) past 4300 digits, RecursionError when too deep.
    status, reply = client.json("/api/jobs", raw=b'{"labels": [0], "seed": 1' + b"0" * 5000 + b"}")
    assert status == 400 and "not valid JSON" in reply["error"]
    status, reply = client.json("/api/jobs", raw=b"[" * 100_000)
    assert status == 400 and "not valid JSON" in reply["error"]
    status, reply = client.json("/api/jobs/999999")
    assert status == 404 and "no job" in reply["error"]
    img = png_data_url(np.zeros((8, 8), np.uint8))
    mask = png_data_url(np.zeros((8, 4), np.uint8))
    status, reply = client.json("/api/jobs", {"labels": [0], "kind": "inpaint", "image": img, "mask": mask})
    assert status == 400 and "the mask is 4x8 px but the image is 8x8 px, another shape" in reply["error"]
    empty = png_data_url(np.zeros((8, 8), np.uint8))
    status, reply = client.json("/api/jobs", {"labels": [0], "kind": "inpaint", "image": img, "mask": empty})
    assert status == 400 and "the mask is empty" in reply["error"]
    status, reply = client.json("/api/jobs", {"labels": [0], "kind": "inpaint", "image": img, "method": "trained"})
    assert status == 400 and "model.inpaint=true" in reply["error"]


def test_cross_site_requests_are_refused(client):
    status, reply = client.json("/api/jobs", raw=b'{"labels": [0]}', content_type="text/plain")
    assert status == 415 and "Content-Type: application/json" in reply["error"]
    req = urllib.request.Request(client.base + "/api/info", headers={"Host": "attacker.example:80"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 403 and "attacker.example" in json.loads(err.value.read())["error"]
    with pytest.raises(ValueError, match="max_queue"):
        Limits(max_queue=0)


def test_sample_job_reports_progress_and_serves_pngs(client):
    s = client.run({"labels": [0, 1, 2, 3, 1, 2], "steps": 5, "seed": 3, "nrow": 3, "sampler": "ddpm"})
    assert s["status"] == "done" and s["images"] == 6 and (s["step"], s["num_steps"]) == (5, 5)
    assert s["progress"] == 1.0 and s["has_preview"]
    status, ctype, grid = client.request(s["grid_url"])
    assert status == 200 and ctype == "image/png"
    assert Image.open(io.BytesIO(grid)).size == (3 * 10 + 2, 2 * 10 + 2)  # 3 x 2 tiles of 8 px, 2 px padding
    status, _, one = client.request(s["image_urls"][4])
    img = np.asarray(Image.open(io.BytesIO(one)))
    assert status == 200 and img.shape == (8, 8)
    # The served image is the sample: same seed, same request -> the same pixels.
    again = client.run({"labels": [0, 1, 2, 3, 1, 2], "steps": 5, "seed": 3, "nrow": 3, "sampler": "ddpm"})
    assert client.request(again["image_urls"][4])[2] == one
    assert client.request(f"/api/jobs/{s['id']}/images/6.png")[0] == 404


def test_concurrent_submissions_are_queued_and_all_complete(client):
    bodies = [{"labels": [k % 4, (k + 1) % 4], "steps": 3, "seed": k} for k in range(6)]
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda b: client.json("/api/jobs", b), bodies))
    assert all(status == 202 for status, _ in replies)
    jobs = [client.studio.get(reply["id"]) for _, reply in replies]
    for job in jobs:
        client.studio.wait(job, timeout=120)
    assert [j.status for j in jobs] == ["done"] * 6 and all(len(j.images) == 2 for j in jobs)
    assert len({j.id for j in jobs}) == 6


def test_full_queue_answers_429_and_recovers():
    studio = tiny_studio(limits=Limits(max_queue=2))
    gate, started = threading.Event(), threading.Event()
    real_run = studio._run

    def blocked_run(job):
        started.set()
        gate.wait(30)
        return real_run(job)

    studio._run = blocked_run
    c = Client(studio)
    try:
        body = {"labels": [0], "steps": 2}
        assert c.json("/api/jobs", body)[0] == 202
        assert started.wait(30)  # the first job is running, so the queue is empty again
        statuses = [c.json("/api/jobs", body)[0] for _ in range(3)]
        assert statuses == [202, 202, 429]
        status, reply = c.json("/api/jobs", body)
        assert status == 429 and "busy" in reply["error"]
        queued = [j for j in studio.jobs.values() if j.status == "queued"]
        assert [studio.position(j) for j in queued] == [0, 1]
        gate.set()
        for job in list(studio.jobs.values()):
            studio.wait(job, timeout=60)
        assert c.json("/api/jobs", body)[0] == 202  # room again
    finally:
        gate.set()
        c.close()


def test_a_failing_job_reports_an_error_without_internals(client, monkeypatch):
    def boom(job):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(client.studio, "_run", boom)
    s = client.run({"labels": [0], "steps": 2})
    assert s["status"] == "error" and "internal error" in s["error"] and "secret" not in s["error"]
    monkeypatch.setattr(client.studio, "_run", lambda job: (_ for _ in ()).throw(ValueError("steps too odd")))
    s = client.run({"labels": [0], "steps": 2})
    assert s["error"] == "steps too odd"  # a ValueError from the model is the user's to read


def test_inpaint_and_outpaint_jobs_keep_the_source(client):
    src = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    s = client.run(
        {
            "labels": [1, 2],
            "kind": "inpaint",
            "image": png_data_url(src),
            "mask": png_data_url(mask),
            "steps": 3,
            "resample": 2,
        }
    )
    assert s["status"] == "done" and s["images"] == 2 and s["num_steps"] == 5  # 3 steps + 2 resampling
    out = np.asarray(Image.open(io.BytesIO(client.request(s["image_urls"][0])[2])))
    keep = mask == 0
    assert np.array_equal(out[keep], src[keep]) and not np.array_equal(out[~keep], src[~keep])
    s = client.run(
        {"labels": [3], "kind": "outpaint", "image": png_data_url(src), "direction": "left", "times": 3, "steps": 2}
    )
    assert s["status"] == "done" and s["rounds"] == 3
    out = np.asarray(Image.open(io.BytesIO(client.request(s["image_urls"][0])[2])))
    assert out.shape == (8, 8 + 3 * 4) and np.array_equal(out[:, -8:], src)


def test_an_overlap_that_keeps_the_whole_window_is_refused_at_validation():
    """On a 4 px model an overlap of 0.9 keeps round(3.6) = 4 px: no round would add a pixel (outpaint
    refuses it too; the studio says so before queueing)."""
    cfg = make_tiny_config("unused")
    cfg.model.input_size, cfg.data.image_size = 4, 4
    with Studio(build_model(cfg, seed=0).eval(), cfg, name="tiny4") as studio:
        image = png_data_url(np.zeros((4, 4), np.uint8))
        body = {"labels": [0], "kind": "outpaint", "image": image, "steps": 1, "overlap": 0.9}
        with pytest.raises(StudioError, match="overlap=0.9 keeps all 4 px of the model's window"):
            studio.validate(body)
        assert studio.validate({**body, "overlap": 0.5})["overlap"] == 0.5


def test_outpainted_picture_is_bounded_and_counted_in_the_work_budget(client):
    # Scaled to the model's 8 px height, a 4096x1 image would be 32768 px wide (before any round).
    thin = png_data_url(np.zeros((1, 4096), np.uint8))
    body = {"labels": [0] * 64, "kind": "outpaint", "image": thin, "direction": "right", "steps": 1}
    status, reply = client.json("/api/jobs", body)
    assert status == 400, reply
    assert "would make a picture 32772 px wide" in reply["error"] and "largest side allowed is 4096" in reply["error"]
    status, reply = client.json("/api/jobs", {**body, "direction": "down"})  # 8 px wide, 1 px tall: fine that way
    assert status == 400 and "too short along the direction" in reply["error"]
    wide = png_data_url(np.zeros((8, 1000), np.uint8))
    p = client.studio.validate({"labels": [0], "kind": "outpaint", "image": wide, "times": 1, "steps": 1})
    assert tuple(p["image"].shape) == (1, 1, 8, 1000)
    # 1 image x 1 step x 2 guided passes x 1 round, plus the 1004 px result held as ceil(1004 / 8) = 126
    # model-size tiles.
    studio = tiny_studio(limits=Limits(max_work=100))
    with pytest.raises(StudioError, match="this request needs 128 image-steps; the limit is 100"):
        studio.validate({"labels": [0], "kind": "outpaint", "image": wide, "times": 1, "steps": 1, "cfg_scale": 2})


def test_the_work_budget_counts_both_passes_of_a_guided_step():
    """Guidance evaluates every image twice per step (conditional and unconditional); it counts double."""
    studio = tiny_studio(limits=Limits(max_work=100))
    assert studio.validate({"labels": [0] * 10, "steps": 10, "cfg_scale": 1})["cfg_scale"] == 1
    with pytest.raises(StudioError, match="this request needs 200 image-steps; the limit is 100"):
        studio.validate({"labels": [0] * 10, "steps": 10, "cfg_scale": 2})
    with pytest.raises(StudioError, match="this request needs 200 image-steps"):
        studio.validate({"labels": [0] * 10, "steps": 10, "cfg_scale": 1, "sampler": "heun"})


def test_finished_status_is_published_after_its_results(client, monkeypatch):
    seen = []

    class Watched(Job):
        def __setattr__(self, name, value):
            if name == "status" and value in ("done", "error"):
                seen.append((value, self.seconds, self.images is not None, self.error))
            super().__setattr__(name, value)

    real_run = client.studio._run

    def watched_run(job):
        job.__class__ = Watched  # from here on every assignment to job.status is recorded
        return real_run(job)

    monkeypatch.setattr(client.studio, "_run", watched_run)
    s = client.run({"labels": [0], "steps": 2, "preview": False})
    assert s["status"] == "done" and s["seconds"] is not None and not s["has_preview"]
    assert len(seen) == 1 and seen[0][0] == "done" and seen[0][1] is not None and seen[0][2]

    def failing_run(job):
        job.__class__ = Watched
        raise ValueError("no such thing")

    monkeypatch.setattr(client.studio, "_run", failing_run)
    s = client.run({"labels": [0], "steps": 2})
    assert s["status"] == "error" and seen[1] == ("error", seen[1][1], False, "no such thing")
    assert seen[1][1] is not None


def test_unconditional_model_takes_a_batch_not_labels():
    c = Client(tiny_studio(num_classes=0))
    try:
        info = c.json("/api/info")[1]
        assert info["conditioning"] == "none" and not info["guidance"] and info["limits"]["max_cfg"] == 1.0
        assert "batch size, not labels" in c.json("/api/jobs", {"labels": [1]})[1]["error"]
        assert "cannot be guided" in c.json("/api/jobs", {"batch": 2, "cfg_scale": 0.5})[1]["error"]
        status, reply = c.json("/api/jobs", {"batch": 2, "cfg_scale": 3})
        assert status == 400 and "cfg_scale must be between 0 and 1" in reply["error"]
        assert c.json("/api/jobs", {"batch": 65})[1]["error"] == "batch must be between 1 and 64, got 65"
        s = c.run({"batch": 3, "steps": 2})
        assert s["status"] == "done" and s["images"] == 3
    finally:
        c.close()


def test_cli_serve_defaults_to_localhost_and_inpaint_outpaint_write_pngs(tmp_path):
    args = build_parser().parse_args(["serve", "--checkpoint", "x"])
    assert args.host == "127.0.0.1" and args.port == 8000
    studio = tiny_studio()
    save_checkpoint(tmp_path / "ckpt", config=studio.config, model=studio.model, ema=studio.model)
    src = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(src).save(tmp_path / "in.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--checkpoint", str(tmp_path / "ckpt"), "--image", str(tmp_path / "in.png"), "--steps", "2"]
    common += ["--device", "cpu", "--no-progress"]
    assert main(["inpaint", *common, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "o.png")]) == 0
    out = np.asarray(Image.open(tmp_path / "o.png"))
    assert out.shape == (8, 8) and np.array_equal(out[:, :4], src[:, :4])
    # Never overwrites: the same --out again is refused.
    assert main(["inpaint", *common, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "o.png")]) == 2
    argv = ["outpaint", *common, "--direction", "down", "--times", "3", "--classes", "1", "2"]
    assert main([*argv, "--out", str(tmp_path / "tall.png")]) == 0
    tall = np.asarray(Image.open(tmp_path / "tall.png"))
    assert tall.shape == (2 * (20 + 2) + 2, 8 + 4)  # two 20x8 results stacked in a padded grid
    assert np.array_equal(tall[2:10, 2:10], src)


TEXT_WORDS = ["top", "bottom", "bar", "a", "the"]


def tiny_text_studio(tmp_path, encoder: str, caption_dropout_prob: float = 0.1) -> Studio:
    """A text-conditioned tiny DiT (16-d text, like the tiny BERT) whose every weight is live."""
    cfg = make_tiny_config("unused")
    model_cfg = dataclasses.replace(
        cfg.model,
        num_classes=0,
        text_dim=16,
        text_mode="both",
        caption_dropout_prob=caption_dropout_prob,
        class_dropout_prob=0.0 if caption_dropout_prob else 0.1,  # guidance must follow the caption dropout
    )
    cfg = dataclasses.replace(cfg, model=model_cfg, text=TextConfig(encoder=encoder, max_length=4))
    model = build_model(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised text paths would make every prompt draw the same image
        for param in model.parameters():
            param.normal_(0, 0.2, generator=g)
    return Studio(model, cfg, name="tiny-text")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("studio_bert"), TEXT_WORDS, max_positions=32)


def test_text_conditioned_checkpoint_samples_from_prompts(tiny_bert, tmp_path, monkeypatch):
    import ditkit.text

    loads = []
    real_load = ditkit.text.load_text_encoder
    monkeypatch.setattr(ditkit.text, "load_text_encoder", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    studio = tiny_text_studio(tmp_path, tiny_bert)
    c = Client(studio)
    try:
        info = c.json("/api/info")[1]
        assert info["conditioning"] == "text" and info["guidance"] and info["defaults"]["cfg_scale"] == 2.0
        assert not loads  # loaded on the first request with prompts, not before
        body = {"prompts": ["top bar", "bottom bar", "top bar"], "steps": 2, "seed": 1, "cfg_scale": 3, "nrow": 3}
        s = c.run(body)
        assert s["status"] == "done" and s["images"] == 3, s
        images = studio.get(s["id"]).images
        expected = generate(
            studio.model,
            studio.config,
            prompts=body["prompts"],
            text_encoder=studio.text_encoder(),
            steps=2,
            seed=1,
            cfg_scale=3.0,
            sampler=studio.config.sample.sampler,
        )
        torch.testing.assert_close(images, expected)
        # The prompt steers the image: the same noise with another prompt gives another picture.
        one = studio.get(c.run({"prompts": ["top bar"], "steps": 2, "seed": 1})["id"]).images
        other = studio.get(c.run({"prompts": ["bottom bar"], "steps": 2, "seed": 1})["id"]).images
        assert (one - other).abs().max() > 1e-3
        # Inpainting and outpainting from prompts: one result per prompt, the same as ditkit.inpainting's.
        image = png_data_url(np.full((8, 8), 200, np.uint8))
        mask = np.zeros((8, 8), np.uint8)
        mask[:, 4:] = 255  # white = fill
        body = {"prompts": ["top bar", "bottom bar"], "kind": "inpaint", "image": image, "mask": png_data_url(mask)}
        s = c.run({**body, "steps": 2, "seed": 1})
        assert s["status"] == "done" and s["images"] == 2, s
        s = c.run({"prompts": ["top bar"], "kind": "outpaint", "image": image, "steps": 2, "seed": 1, "times": 1})
        assert s["status"] == "done" and studio.get(s["id"]).images.shape == (1, 1, 8, 12), s
        assert loads == [1]  # one encoder for every request
        refused = [
            ({"labels": [0]}, "it takes prompts, not labels"),
            ({"prompts": []}, "prompts must be a non-empty list of strings"),
            ({"prompts": "top bar"}, "prompts must be a non-empty list of strings"),
            ({"prompts": ["top", 3]}, "prompts must be non-empty strings, got 3"),
            ({"prompts": ["top", "  "]}, "prompts must be non-empty strings, got '  '"),
            ({"prompts": ["a" * 1001]}, "prompts must be at most 1000 characters, got one of 1001"),
            ({"prompts": ["top"] * 65}, "at most 64 images per request, got 65 prompts"),
            ({"prompts": ["top"], "cfg_scale": 21}, "cfg_scale must be between 0 and 20"),
        ]
        for body, message in refused:
            status, reply = c.json("/api/jobs", body)
            assert status == 400 and message in reply["error"], (body, reply)
    finally:
        c.close()


def test_text_guidance_follows_caption_dropout_and_a_missing_encoder_is_named(tiny_bert, tmp_path, monkeypatch):
    import ditkit.text

    studio = tiny_text_studio(tmp_path, tiny_bert, caption_dropout_prob=0.0)  # class_dropout_prob is 0.1
    info = studio.info()
    assert info["conditioning"] == "text" and not info["guidance"] and info["limits"]["max_cfg"] == 1.0
    with pytest.raises(StudioError, match="cannot be guided .no null text"):
        studio.validate({"prompts": ["top bar"], "cfg_scale": 0.5})
    assert studio.validate({"prompts": ["top bar"]})["cfg_scale"] == 1.0
    missing = str(tmp_path / "no-encoder")
    c = Client(tiny_text_studio(tmp_path, missing))
    try:
        status, reply = c.json("/api/jobs", {"prompts": ["top bar"], "steps": 2})
        assert status == 500 and "cannot load this checkpoint's text encoder" in reply["error"], reply
        assert f"text.encoder={missing}" in reply["error"]
        assert c.json("/api/jobs", {"prompts": ["top bar"], "steps": 0})[0] == 400  # bad input first, no load
        loads = []
        real_load = ditkit.text.load_text_encoder
        monkeypatch.setattr(ditkit.text, "load_text_encoder", lambda *a, **k: loads.append(1) or real_load(*a, **k))
        # a failed load is answered again without loading again
        assert c.json("/api/jobs", {"prompts": ["top bar"], "steps": 2}) == (status, reply)
        assert loads == [] and "restart the studio" in reply["error"]
    finally:
        c.close()


def test_a_text_encoder_without_weights_is_refused_at_validation_once(tmp_path, monkeypatch):
    """TextEncoder reads its weights on first use; the studio loads them while validating, so a folder
    whose weights file is missing (an interrupted download) is the request's 500, not a queued job's
    error, and later requests get the same answer without another load."""
    import ditkit.text

    (tmp_path / "bert").mkdir()
    folder = save_tiny_bert(tmp_path / "bert", TEXT_WORDS, max_positions=32)
    (tmp_path / "bert" / "model.safetensors").unlink()
    loads = []
    real = ditkit.text.TextEncoder.model.fget
    monkeypatch.setattr(ditkit.text.TextEncoder, "model", property(lambda self: loads.append(1) or real(self)))
    studio = tiny_text_studio(tmp_path, folder)
    answers = []
    for _ in range(2):
        with pytest.raises(StudioError) as err:
            studio.submit({"prompts": ["top bar"], "steps": 2})
        answers.append((err.value.status, str(err.value)))
    assert answers[0] == answers[1] and answers[0][0] == 500
    assert "cannot load this checkpoint's text encoder" in answers[0][1] and f"text.encoder={folder}" in answers[0][1]
    assert loads == [1] and not studio.jobs


def test_steps_are_bounded_by_the_models_process_and_advertised():
    """A vp model trained with 50 timesteps grids at most 50 sampling steps: 60 is refused at validation
    (naming steps and the range), not queued to fail in the worker, and /api/info reports 50."""
    cfg = make_tiny_config("unused")
    cfg.diffusion.num_timesteps = 50
    studio = Studio(build_model(cfg, seed=0).eval(), cfg, name="tiny")
    assert studio.info()["limits"]["max_steps"] == 50
    with pytest.raises(StudioError, match="steps 60: this model's process has 50 timesteps; give 1 to 50"):
        studio.submit({"labels": [0], "steps": 60})
    assert not studio.jobs
    assert studio.validate({"labels": [0], "steps": 50})["steps"] == 50
    # The studio's own limit stays the bound where it is the smaller one.
    small = Studio(build_model(cfg, seed=0).eval(), cfg, name="tiny", limits=Limits(max_steps=20))
    assert small.info()["limits"]["max_steps"] == 20
    # A checkpoint whose sample.steps exceeds the bound: a request naming no steps takes the bound.
    cfg.sample.steps = 60
    long = Studio(build_model(cfg, seed=0).eval(), cfg, name="tiny")
    assert long.info()["defaults"]["steps"] == 50 and long.validate({"labels": [0]})["steps"] == 50


def test_host_header_parsing_and_loopback_addresses():
    assert [host_of(h) for h in ("[::1]", "[::1]:8000", "localhost:80", "127.0.0.1", "::1", "[::1]x")] == [
        "::1",
        "::1",
        "localhost",
        "127.0.0.1",
        "::1",
        "[::1]x",
    ]
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"))
    assert not any(is_loopback(h) for h in ("localhost", "127.0.0.1.evil.example", "10.0.0.1", "::", ""))


def _get(host: str, port: int, header: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("GET", "/api/info", skip_host=True)
    conn.putheader("Host", header)
    conn.endheaders()
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def _serving(studio: Studio, host: str):
    server = make_server(studio, host, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_any_loopback_address_checks_the_host_header(client):
    status, reply = _get("127.0.0.1", client.server.server_address[1], "[::1]")  # IPv6 literal, no port
    assert status == 200 and reply["conditioning"] == "class"
    try:
        server = _serving(client.studio, "127.0.0.2")  # all of 127.0.0.0/8 is loopback on Linux
    except OSError as err:
        pytest.skip(f"cannot listen on 127.0.0.2 here: {err}")
    try:
        port = server.server_address[1]
        assert server.loopback
        assert _get("127.0.0.2", port, f"127.0.0.2:{port}")[0] == 200
        status, reply = _get("127.0.0.2", port, "attacker.example")
        assert status == 403 and "attacker.example" in reply["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_serves_on_ipv6_loopback(client):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    server = _serving(client.studio, "::1")
    try:
        port = server.server_address[1]
        assert server.server_address[0] == "::1" and server.loopback
        assert _get("::1", port, f"[::1]:{port}")[0] == 200
        assert _get("::1", port, "localhost")[0] == 200
        assert _get("::1", port, "rebound.example:80")[0] == 403
    finally:
        server.shutdown()
        server.server_close()
    server = make_server(client.studio, "[::1]", 0)  # as written in URLs
    assert server.server_address[0] == "::1"
    server.server_close()


def test_cancel_stops_a_running_job_and_a_queued_one_never_starts(monkeypatch):
    """POST /api/jobs/ID/cancel: a running job stops at its next step without images, a queued one never
    runs and takes no place in the queue, and a finished job answers 409."""
    studio = tiny_studio(limits=Limits(max_queue=1))
    gate = threading.Event()
    real_callback = studio._callback

    def held_callback(job):  # the first job waits at its first step until the test lets it go on
        inner = real_callback(job)

        def callback(info):
            inner(info)
            if job.id == "1":
                gate.wait(timeout=30)

        return callback

    monkeypatch.setattr(studio, "_callback", held_callback)
    c = Client(studio)
    try:
        running = c.json("/api/jobs", {"labels": [0], "steps": 50})[1]["id"]
        deadline = time.time() + 30
        while studio.get(running).step == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert studio.get(running).status == "running"
        queued = c.json("/api/jobs", {"labels": [1], "steps": 5})[1]["id"]
        assert c.json("/api/jobs", {"labels": [1], "steps": 5})[0] == 429  # max_queue=1: full
        status, reply = c.json(f"/api/jobs/{queued}/cancel", {})
        assert status == 200 and reply["status"] == "cancelled"
        later = c.json("/api/jobs", {"labels": [2], "steps": 3})  # the cancelled job takes no place
        assert later[0] == 202, later
        status, reply = c.json(f"/api/jobs/{running}/cancel", {})
        assert status == 200 and reply["status"] == "running"  # stops at its next step
        gate.set()
        job = studio.wait(studio.get(running))
        assert job.status == "cancelled" and job.images is None and job.step < 50
        done = studio.wait(studio.get(later[1]["id"]))
        assert done.status == "done" and studio.get(queued).step == 0  # the cancelled one never ran
        status, reply = c.json(f"/api/jobs/{done.id}/cancel", {})
        assert status == 409 and "already finished (done)" in reply["error"]
        assert c.json("/api/jobs/999/cancel", {})[0] == 404
        assert c.json(f"/api/jobs/{done.id}/cancel", raw=b"{}", content_type="text/plain")[0] == 415
    finally:
        gate.set()
        c.close()


def test_a_cancel_after_the_last_step_still_cancels_and_cancelled_jobs_cannot_pile_up(monkeypatch):
    """A cancel answered while the job's result was being made ends the job cancelled (not done, with
    images); and submit-then-cancel while one job runs is bounded (cancelled jobs wait in the queue for
    the worker to pass them, holding nothing of their request)."""
    studio = tiny_studio(limits=Limits(max_queue=2, keep_jobs=3))
    real_run = studio._run

    def run_then_cancel(job):
        images = real_run(job)  # every step done
        if job.id == "1":
            assert studio.cancel(job).status == "running"  # answered 200 "running" by the API
        return images

    monkeypatch.setattr(studio, "_run", run_then_cancel)
    job = studio.wait(studio.submit({"labels": [0], "steps": 2}))
    assert job.status == "cancelled" and job.images is None
    with pytest.raises(StudioError, match="already finished .cancelled."):
        studio.cancel(job)

    gate = threading.Event()
    monkeypatch.setattr(studio, "_run", lambda job: gate.wait(30) and real_run(job))
    busy = studio.submit({"labels": [0], "steps": 2})
    while busy.status != "running":
        time.sleep(0.01)
    accepted = 0
    with pytest.raises(StudioError, match=r"busy \(0 requests waiting, 5 cancelled ones not yet passed"):
        for _ in range(50):
            cancelled = studio.cancel(studio.submit({"labels": [1], "steps": 2}))
            assert cancelled.params == {"kind": "sample"}  # its inputs are dropped
            accepted += 1
    assert accepted == 2 + 3 and studio.queue.qsize() == 5  # max_queue + keep_jobs
    gate.set()
    studio.wait(busy)
    deadline = time.time() + 30
    while studio.queue.unfinished_tasks and time.time() < deadline:
        time.sleep(0.01)
    assert studio.queue.qsize() == 0
    assert studio.wait(studio.submit({"labels": [1], "steps": 2})).status == "done"  # room again


# ----- serve on a busy port, closing a studio ------------------------------------------------------


def test_cli_serve_on_a_busy_port_fails_at_once_without_loading_the_model(monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(ditkit.train, "load_model", lambda *args, **kwargs: loaded.append(args))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--checkpoint", "nowhere", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"ditkit serve: error: cannot listen on 127.0.0.1:{port}: Address already in use;" in err
        assert "choose another --port (0 picks a free one)" in err and "Traceback" not in err
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            make_server(tiny_studio(), "127.0.0.1", port)
    # 192.0.2.1 (TEST-NET-1) is no address of this machine.
    assert main(["serve", "--checkpoint", "nowhere", "--host", "192.0.2.1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 192.0.2.1:0: Cannot assign requested address; --host must be an address" in err
    assert loaded == []  # refused before the checkpoint was read


def test_serve_closes_its_studio_when_it_stops(monkeypatch):
    studio = tiny_studio()
    monkeypatch.setattr(ditkit.train, "load_model", lambda *args: (studio.model, studio.config))
    made = []
    monkeypatch.setattr(ditkit.studio.server, "Studio", lambda *a, **k: made.append(Studio(*a, **k)) or made[-1])

    def interrupted(self, poll_interval=0.5):  # Ctrl+C while serving
        raise KeyboardInterrupt

    monkeypatch.setattr(ditkit.studio.server._Server, "serve_forever", interrupted)
    ditkit.studio.server.serve("tiny", port=0, device="cpu")
    assert len(made) == 1 and made[0].closed and not made[0].worker.is_alive()
    studio.close()


def test_close_cancels_the_running_job_and_ends_the_worker(monkeypatch):
    studio = tiny_studio()
    started, gate = threading.Event(), threading.Event()
    real_callback = studio._callback

    def held_callback(job):
        inner = real_callback(job)

        def callback(info):
            inner(info)
            if job.id == "1":
                started.set()
                gate.wait(timeout=30)

        return callback

    monkeypatch.setattr(studio, "_callback", held_callback)
    running = studio.submit({"labels": [0], "steps": 50})
    queued = studio.submit({"labels": [1], "steps": 2})
    assert started.wait(30) and running.status == "running"
    closer = threading.Thread(target=studio.close)
    closer.start()
    deadline = time.time() + 30
    while not studio.closed and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(StudioError, match="shutting down") as err:
        studio.submit({"labels": [0], "steps": 2})
    assert err.value.status == 503
    gate.set()
    closer.join(30)
    assert not closer.is_alive() and not studio.worker.is_alive()
    assert running.status == "cancelled" and running.images is None and running.step == 1
    assert queued.status == "cancelled" and queued.step == 0
    studio.close()  # again: nothing more to do

    with tiny_studio() as studio:
        assert studio.wait(studio.submit({"labels": [2], "steps": 2})).status == "done"
    assert not studio.worker.is_alive()


def test_a_studio_dropped_without_close_is_collected_with_its_worker():
    studios = [tiny_studio() for _ in range(3)]
    assert studios[0].wait(studios[0].submit({"labels": [0], "steps": 2})).status == "done"
    workers, refs = [s.worker for s in studios], [weakref.ref(s) for s in studios]
    del studios
    gc.collect()
    for worker in workers:
        worker.join(10)
    assert [w.is_alive() for w in workers] == [False] * 3 and [r() for r in refs] == [None] * 3


# ----- batches over 64 images, latent checkpoints --------------------------------------------------


def test_a_request_over_64_images_runs_as_one_batch_with_monotone_progress(monkeypatch):
    studio = tiny_studio(limits=Limits(max_batch=100))
    seen = []
    real_callback = studio._callback

    def spy(job):
        inner = real_callback(job)

        def callback(info):
            inner(info)
            seen.append((job.progress(), len(job.preview)))

        return callback

    monkeypatch.setattr(studio, "_callback", spy)
    with studio:
        job = studio.wait(studio.submit({"labels": [1] * 100, "steps": 3, "cfg_scale": 1}), timeout=120)
    assert job.status == "done" and len(job.images) == 100
    progress = [p for p, _ in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) == 3
    assert {n for _, n in seen} == {100}  # the preview shows every image, not a batch of them


@pytest.fixture(scope="module")
def latent_studio(tmp_path_factory):
    """A tiny DiT on the 4-channel latents of a random-weight AutoencoderKL (16x16 RGB images)."""
    pytest.importorskip("diffusers")
    vae = tmp_path_factory.mktemp("studio_vae") / "kl"
    save_tiny_autoencoder_kl(vae)
    cfg = resolve_autoencoder(
        Config(
            model=ModelConfig(patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=3, learn_sigma=False),
            data=DataConfig(dataset="folder", root="unused", image_size=16, channels=3, holdout=0),
            autoencoder=AutoencoderConfig(kind="kl", path=str(vae)),
            sample=SampleConfig(steps=3, cfg_scale=2.0),
        )
    )
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    studio = Studio(model, cfg, name="tiny-latent")
    yield studio
    studio.close()


def test_a_latent_checkpoint_s_info_gives_the_image_size_and_the_latents(latent_studio):
    """The page's header shows the images the studio returns (decoded: 16x16 RGB), and the latents beside."""
    info = latent_studio.info()
    assert (info["height"], info["width"], info["channels"]) == (16, 16, 3)
    assert info["latent"] == [4, 8, 8]


def test_a_latent_checkpoint_builds_its_autoencoder_once_and_previews_images(latent_studio, monkeypatch):
    studio = latent_studio
    studio._autoencoder = ditkit.studio.jobs._LoadOnce("autoencoder", studio._load_autoencoder)  # as a fresh studio
    built = []
    for module in (ditkit.autoencoders, ditkit.sampling):  # the studio's and generate's way of building it
        real = module.build_autoencoder
        monkeypatch.setattr(module, "build_autoencoder", lambda *a, real=real, **k: built.append(1) or real(*a, **k))
    jobs = [studio.wait(studio.submit({"labels": [0, 2], "steps": 2}), timeout=120) for _ in range(3)]
    assert [j.status for j in jobs] == ["done"] * 3 and len(built) == 1
    grid = Image.open(io.BytesIO(jobs[-1].png("grid")))
    preview = Image.open(io.BytesIO(jobs[-1].png("preview")))
    assert grid.mode == preview.mode == "RGB" and preview.size == grid.size == (2 * 18 + 2, 20)  # 16 px images
    # How often the preview is decoded (the final images are one more decode).
    ae = studio.autoencoder()
    decodes = []
    monkeypatch.setattr(ae, "decode", lambda z, real=ae.decode: decodes.append(len(z)) or real(z))
    monkeypatch.setattr(studio, "preview_min_interval", 3600.0)
    assert studio.wait(studio.submit({"labels": [0], "steps": 5, "cfg_scale": 1}), timeout=120).status == "done"
    assert len(decodes) == 1 + 1  # the first step's preview only
    decodes.clear()
    monkeypatch.setattr(studio, "preview_min_interval", 0.0)
    monkeypatch.setattr(studio, "preview_overhead", 1.0)  # no limit: every step
    assert studio.wait(studio.submit({"labels": [0], "steps": 5, "cfg_scale": 1}), timeout=120).status == "done"
    assert len(decodes) == 5 + 1
    decodes.clear()
    assert studio.wait(studio.submit({"labels": [0], "steps": 5, "preview": False}), timeout=120).status == "done"
    assert len(decodes) == 1


def test_inpainting_a_latent_checkpoint_names_the_real_limit(latent_studio, tmp_path):
    image = png_data_url(np.zeros((16, 16, 3), np.uint8))
    mask = png_data_url(np.full((16, 16), 255, np.uint8))
    with pytest.raises(StudioError, match=r"need a pixel-space checkpoint \(autoencoder.kind='pixel'\); this one is a"):
        latent_studio.validate({"labels": [0], "kind": "inpaint", "image": image, "mask": mask})
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in.png")
    with pytest.raises(ConfigError, match=r"latent model \(autoencoder.kind='kl', 4 latent channels\)"):
        load_image(tmp_path / "in.png", latent_studio.config)


# ----- `ditkit inpaint` makes the studio's checks ------------------------------------------------------


def test_cli_inpaint_refuses_empty_and_mis_sized_masks_as_the_studio_does(tmp_path, capsys):
    studio = tiny_studio()
    studio.close()
    save_checkpoint(tmp_path / "ckpt", config=studio.config, model=studio.model, ema=studio.model)
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.full((8, 4), 255, np.uint8)).save(tmp_path / "small.png")  # 4 wide, 8 high
    big = np.zeros((64, 64), np.uint8)
    big[0, 0] = 255  # one white pixel, which NEAREST scaling to the model's 8x8 does not sample
    Image.fromarray(big).save(tmp_path / "dot64.png")
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(tmp_path / "in64.png")
    argv = ["inpaint", "--checkpoint", str(tmp_path / "ckpt"), "--steps", "2", "--device", "cpu", "--no-progress"]
    out = tmp_path / "out.png"
    cases = [
        ("in.png", "empty.png", f"the mask {tmp_path / 'empty.png'} is empty (no white pixel)"),
        (
            "in.png",
            "small.png",
            f"the mask {tmp_path / 'small.png'} is 4x8 px but the image {tmp_path / 'in.png'} is 8x8 px, another",
        ),
        ("in64.png", "dot64.png", f"mask {tmp_path / 'dot64.png'} marks only 1 px to fill, and none is left once"),
    ]
    for image, mask, message in cases:
        rc = main([*argv, "--image", str(tmp_path / image), "--mask", str(tmp_path / mask), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.startswith("ditkit inpaint: error: "), err
        assert not out.exists()
    # A painted layer over transparency marks the region by its alpha, in the CLI and in the studio alike.
    layer = np.zeros((8, 8, 4), np.uint8)
    layer[:, 4:, 3] = 255
    Image.fromarray(layer, "RGBA").save(tmp_path / "layer.png")
    known = load_mask(tmp_path / "layer.png", (8, 8), image=tmp_path / "in.png")
    assert known[..., :4].eq(1).all() and known[..., 4:].eq(0).all()
    image = png_data_url(np.zeros((8, 8), np.uint8))
    p = studio.validate({"labels": [0], "kind": "inpaint", "image": image, "mask": png_data_url(layer)})
    assert torch.equal(p["known_mask"], known)
    rc = main([*argv, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "layer.png"), "--out", str(out)])
    assert rc == 0 and np.array_equal(np.asarray(Image.open(out))[:, :4], np.full((8, 4), 128, np.uint8))
    # A mask of another size but the image's shape (here the 64 px image's mask at the model's 8 px) is scaled.
    half = np.zeros((8, 8), np.uint8)
    half[:, 4:] = 255
    Image.fromarray(half).save(tmp_path / "half8.png")
    assert torch.equal(load_mask(tmp_path / "half8.png", (8, 8), image=tmp_path / "in64.png"), known)


def test_repaint_jobs_ignore_the_pages_sampler(client):
    """The page sends its sampler with every request; RePaint has steps of its own, and `inpaint` refuses a
    sampler passed to it, so the studio passes each method only its own settings."""
    src = np.full((8, 8), 90, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 255
    body = {"labels": [1], "kind": "inpaint", "image": png_data_url(src), "mask": png_data_url(mask), "steps": 2}
    for sampler in ("euler", "heun"):
        s = client.run({**body, "sampler": sampler, "resample": 2})
        assert s["status"] == "done" and s["error"] is None, s
        out = np.asarray(Image.open(io.BytesIO(client.request(s["image_urls"][0])[2])))
        assert np.array_equal(out[:, 4:], src[:, 4:])
