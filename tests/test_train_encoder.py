"""pretraining/train_encoder.py (the stand-in for EfficientSAM's weights) and benchmarks/pretrained.py (issue 34)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import TINY, cli
from test_efficientsam import fake_encoder_state, official_shapes, save_official

from dataloader.datamodule import DiffMICDataModule, build_datasets
from diffmic.config import ConfigError, load_config
from diffmic.methods import build_system
from diffmic.utils import build_trainer
from pretraining.train_encoder import load_classifier, pretrain_encoder, sidecar_path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# the demo, tiny, with the small ViT and one epoch of encoder pre-training
ENCODER = [*TINY, "model.image_encoder=vit_t", "encoder_pretraining.epochs=2", "encoder_pretraining.batch_size=16"]


def tiny_config(tmp_path: Path, *extra: str) -> dict:
    return load_config(None, [*ENCODER, f"trainer.log_dir={tmp_path / 'logs'}", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[dict, dict, Path]:
    """One tiny pre-training: its config, the report it returned and its encoder file."""
    tmp_path = tmp_path_factory.mktemp("encoder")
    cfg = tiny_config(tmp_path)
    report = pretrain_encoder(cfg)
    return cfg, report, tmp_path / "logs" / cfg["name"] / "encoder.pt"


@pytest.mark.slow
def test_file_has_the_official_layout(trained, tmp_path):
    _, report, path = trained
    saved = torch.load(path, map_location="cpu", weights_only=True)
    encoder = {k: tuple(v.shape) for k, v in saved["model"].items()}
    # the image_encoder.* keys of a file made in the official layout by the EfficientSAM tests, less its neck
    made = save_official(tmp_path / "efficient_sam_vitt.pt", fake_encoder_state("vit_t"))
    official = torch.load(made, map_location="cpu", weights_only=True)["model"]
    official = {k: tuple(v.shape) for k, v in official.items() if k.startswith("image_encoder.") and ".neck." not in k}
    assert encoder == official == {f"image_encoder.{k}": v for k, v in official_shapes("vit_t").items()}
    # provenance inside, beside "model"; the SHA-256 of the file and the classifier's metrics beside it
    assert saved["trained_from"] == report["trained_from"]
    assert saved["trained_from"]["epochs"] == 2 and saved["trained_from"]["seed"] == 7
    side = json.loads(sidecar_path(path).read_text())
    assert side["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(side["test"]) >= {"acc", "f1", "auc", "kappa"} and len(side["val_history"]) == 2


@pytest.mark.slow
def test_file_loads_through_efficientsam_weights_and_reproduces_the_encoder(trained, tmp_path, caplog):
    cfg, report, path = trained
    # the classifier rebuilt from the file gives the trained one's test metrics exactly
    classifier = load_classifier(cfg, path).eval()
    trainer, _ = build_trainer(cfg, "reload", 1, 1, resumable=False)
    trainer.test(classifier, datamodule=DiffMICDataModule(cfg, datasets=build_datasets(cfg)), verbose=False)
    assert classifier.last_metrics == report["test"]
    # DiffMIC-v2's own loading of model.efficientsam_weights: the same encoder, bit for bit, and the log names the file
    run_cfg = tiny_config(tmp_path, f"model.efficientsam_weights={path}", "model.patch_encoder_weights=null")
    system = build_system(run_cfg)
    with caplog.at_level(logging.INFO):
        system.load_initial_weights()
    assert any(str(path) in r.getMessage() and "Loaded 147" in r.getMessage() for r in caplog.records)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(system.denoiser.image_encoder.eval()(x), classifier.encoder(x))


@pytest.mark.slow
def test_classifier_is_fitted_on_the_training_split_only(trained, tmp_path):
    cfg, report, path = trained
    other = tiny_config(tmp_path, "data.synthetic.num_test=40")  # only the test split differs
    again = pretrain_encoder(other)
    assert again["sha256"] == report["sha256"]
    assert again["val"] == report["val"] and again["val_history"] == report["val_history"]
    assert again["trained_from"] == report["trained_from"]
    assert again["test"] != report["test"]  # 40 other test images


@pytest.mark.slow
def test_a_full_official_file_and_another_image_size_load(trained, tmp_path, caplog):
    cfg, _, path = trained
    saved = torch.load(path, map_location="cpu", weights_only=True)
    # the official full model: encoder, neck, prompt encoder and mask decoder; only the encoder is taken, and said so
    full = {k.removeprefix("image_encoder."): v for k, v in saved["model"].items()}
    official = save_official(tmp_path / "efficient_sam_vitt.pt", full)
    system = build_system(tiny_config(tmp_path, f"model.efficientsam_weights={official}"))
    with caplog.at_level(logging.INFO):
        system.denoiser.load_image_encoder(str(official), 64)
    assert any(
        "3 tensors of the neck, prompt encoder and mask decoder not used" in r.getMessage() for r in caplog.records
    )
    # a file pre-trained at another image size loads whole, with a warning that names both sizes
    saved["trained_from"]["image_size"] = 32
    small = tmp_path / "encoder_32.pt"
    torch.save(saved, small)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        system.denoiser.load_image_encoder(str(small), 64)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("image size 32" in m and "data.image_size 64" in m for m in warnings)
    for k, v in saved["model"].items():
        assert torch.equal(system.denoiser.image_encoder.state_dict()[k.removeprefix("image_encoder.")], v), k


@pytest.mark.slow
def test_a_file_of_the_other_vit_size_is_refused_with_exit_2(trained, tmp_path):
    _, _, path = trained
    logs = tmp_path / "logs"
    result = cli(
        "fit",
        *TINY,
        "dcg.epochs=1",
        "model.image_encoder=vit_s",
        f"model.efficientsam_weights={path}",
        f"trainer.log_dir={logs}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert "model.efficientsam_weights" in errors[0] and "looks like vit_t (width 192)" in errors[0]
    assert "vit_s (width 384)" in errors[0]
    assert not (logs / "demo" / "dcg.pt").exists(), "refused before the DCG pre-training: before any work"


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("encoder_pretraining.epochs=0", r"encoder_pretraining\.epochs: must be at least 1, got 0"),
        ("encoder_pretraining.batch_size=0", r"encoder_pretraining\.batch_size: must be at least 1"),
        ("encoder_pretraining.lr=0", r"encoder_pretraining\.lr: must be > 0"),
        ("encoder_pretraining.min_lr_ratio=1.5", r"encoder_pretraining\.min_lr_ratio: must be in \[0, 1\]"),
        ("encoder_pretraining.weight_decay=-1", r"encoder_pretraining\.weight_decay: must be >= 0"),
    ],
)
def test_config_checks(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


@pytest.mark.slow
def test_command_line_writes_the_file_and_refuses_bad_config(tmp_path):
    logs = tmp_path / "logs"
    result = cli(
        *ENCODER,
        "encoder_pretraining.epochs=1",
        f"trainer.log_dir={logs}",
        f"encoder_pretraining.ckpt={tmp_path / 'enc.pt'}",
        script="pretraining/train_encoder.py",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "enc.pt").is_file() and (tmp_path / "enc.pt.json").is_file()
    result = cli("encoder_pretraining.lr=-1", script="pretraining/train_encoder.py")
    assert result.returncode == 2 and "encoder_pretraining.lr" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "medmnist" / "breastmnist.npz").is_file(), reason=f"{SHARED} is absent")
def test_pretrained_benchmark_smoke(tmp_path):
    from PIL import Image

    from benchmarks import pretrained

    argv = [
        "--config",
        str(ROOT / "configs" / "bench_breastmnist.yml"),
        "--epochs",
        "2",
        "--seeds",
        "0",
        "--out-dir",
        str(tmp_path),
        "--name",
        "smoke_pretrained",
        f"data.root={SHARED / 'medmnist'}",
        f"trainer.log_dir={tmp_path / 'logs'}",
        "dcg.epochs=1",
        "encoder_pretraining.epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "model.feature_dim=16",
        "model.image_encoder=vit_t",
    ]
    assert pretrained.main(argv) == 0
    report = json.loads((tmp_path / "smoke_pretrained.json").read_text())
    assert [r["method"] for r in report["runs"]] == list(pretrained.METHODS)
    rows = {r["method"]: r for r in report["runs"]}
    assert rows["resnet18"]["epochs"] == 1 + 2 and rows["encoder"]["epochs"] == 1
    for method in ("diffmic", "diffmic_pretrained"):
        assert len(rows[method]["val_history"]) == 2
        assert set(rows[method]["uncertainty"]["test_scaled"]) >= {"calib/ece", "selective/eaurc/max_prob"}
    seed_dir = tmp_path / "logs" / "bench_breastmnist" / "seed_0"
    config = (next((seed_dir / "long_2" / "diffmic_pretrained").glob("version_*/config.yaml"))).read_text()
    assert str(seed_dir / "encoder.pt") in config  # the DiffMIC-v2 run started from this seed's encoder file
    text = (tmp_path / "smoke_pretrained.md").read_text()
    assert "![validation curves](smoke_pretrained.png)" in text and "ECE after T" in text
    with Image.open(tmp_path / "smoke_pretrained.png") as image:
        assert image.format == "PNG"
    assert "| pre-trained encoder's classifier | 0 | " in text  # the seeds each mean is over
    # --rewrite: the same text from the JSON alone, nothing trained
    (tmp_path / "smoke_pretrained.md").unlink()
    rewrite = ["--rewrite", "--out-dir", str(tmp_path), "--name"]
    assert pretrained.main([*rewrite, "smoke_pretrained"]) == 0
    assert (tmp_path / "smoke_pretrained.md").read_text() == text
    assert pretrained.main([*rewrite, "absent"]) == 2
    with pytest.raises(SystemExit):  # the config and the runs come from the JSON alone
        pretrained.main([*argv, "--rewrite"])
    # --resume keeps every row and trains nothing; a row reused from a learning-curves report is marked as such
    stamp = (seed_dir / "encoder.pt").stat().st_mtime_ns
    assert pretrained.main([*argv, "--resume"]) == 0
    assert json.loads((tmp_path / "smoke_pretrained.json").read_text())["runs"] == report["runs"]
    assert (seed_dir / "encoder.pt").stat().st_mtime_ns == stamp
    long = {"epochs": 2, "config": report["config"], "runs": [{**rows["diffmic"], "seed": 0}]}
    (tmp_path / "long.json").write_text(json.dumps(long))
    again = [*argv[:9], "reused", *argv[10:], "--methods", "diffmic", "--reuse", str(tmp_path / "long.json")]
    assert pretrained.main(again) == 0
    reused = json.loads((tmp_path / "reused.json").read_text())["runs"]
    assert [r["reused_from"] for r in reused] == ["long.json"]


@pytest.mark.slow
def test_a_cut_off_diffmic_row_resumes_from_its_own_last_checkpoint(tmp_path):
    """benchmarks.pretrained.unfinished_run: an earlier attempt's last.ckpt is resumed only when the config.yaml
    beside it is this very run's (another epoch count or encoder file is another run)."""
    import yaml

    from benchmarks.learning_curves import long_config
    from benchmarks.pretrained import unfinished_run

    run_cfg = long_config(tiny_config(tmp_path), "diffmic_pretrained", 2)
    assert unfinished_run(run_cfg) is None
    version = Path(run_cfg["trainer"]["log_dir"]) / run_cfg["name"] / "version_0"
    (version / "checkpoints").mkdir(parents=True)
    (version / "checkpoints" / "last.ckpt").write_bytes(b"stand-in")
    (version / "config.yaml").write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    assert unfinished_run(run_cfg) == version / "checkpoints" / "last.ckpt"
    assert unfinished_run(long_config(tiny_config(tmp_path), "diffmic_pretrained", 3)) is None
    other = json.loads(json.dumps(run_cfg))
    other["model"]["efficientsam_weights"] = str(tmp_path / "another_encoder.pt")
    assert unfinished_run(other) is None
