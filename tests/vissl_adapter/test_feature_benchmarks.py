"""VISSL's extraction-based benchmarks on the CPU (convit_ssl/vissl/benchmarks.py):
feature extraction through VISSL's `extract_features` engine equals the trunk's
own forward, the weighted kNN equals scikit-learn's on the same features, on 1
and 2 processes; VOC07-style SVMs and low-shot SVMs (VOC07 and Places205
layouts) run end to end on the digits; and the shipped configs compose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier
from torchvision import transforms

from convit_ssl.evaluation import knn_accuracy, knn_scores
from convit_ssl.models import create_model
from convit_ssl.vissl.configs import compose
from convit_ssl.vissl.model.trunk import named_features
from helpers import REPO, filelist_overrides, folder_overrides, run_tool

MICRO = dict(img_size=32, patch_size=8, width=48, depth=3, num_gpsa_layers=2, num_classes=0)
KNN_TWIN = "config=test/convit_ssl/benchmark/knn_micro_folder_in1k"
SVM_TWIN = "config=test/convit_ssl/benchmark/svm_micro_filelist_voc07"
CONFIG_DIR = REPO / "configs" / "config"


def _sklearn_knn_top1(train_x, train_y, test_x, test_y, k=20, temperature=0.07) -> float:
    """DINO's weighted kNN as scikit-learn computes it: cosine distance d, weight exp((1 - d) / T)."""
    clf = KNeighborsClassifier(
        n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / temperature)
    )
    clf.fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean() * 100)


# ------------------------------------------------------------ the kNN rule
def test_knn_matches_sklearn_on_clustered_features():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=gen)
    train_y, test_y = torch.randint(0, 6, (300,), generator=gen), torch.randint(0, 6, (80,), generator=gen)
    train_x = centres[train_y] + 1.5 * torch.randn(300, 16, generator=gen)
    test_x = centres[test_y] + 1.5 * torch.randn(80, 16, generator=gen)
    ours = knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07, chunk_size=7)
    theirs = _sklearn_knn_top1(train_x.numpy(), train_y.numpy(), test_x.numpy(), test_y.numpy())
    assert 30 < ours["top1"] < 100  # neither trivial nor perfect
    assert ours["top1"] == pytest.approx(theirs, abs=1e-9)
    assert ours["top5"] >= ours["top1"]


def test_knn_scores_are_the_weighted_votes():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    scores = knn_scores(train, torch.tensor([0, 1, 1]), torch.tensor([[2.0, 0.0]]), k=2, temperature=0.5)
    # nearest: [1, 0] (cos 1, class 0) and [1, 1] (cos 0.7071, class 1)
    torch.testing.assert_close(scores, torch.tensor([[np.exp(2.0), np.exp(0.70710678 / 0.5)]], dtype=torch.float32))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: knn_scores(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, 5)), "feature widths differ"),
        (lambda: knn_scores(torch.zeros(3, 4), torch.zeros(2), torch.zeros(2, 4)), "2 train labels for 3"),
        (lambda: knn_scores(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, 4), k=0), "k must be >= 1"),
    ],
)
def test_knn_input_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    """A VISSL-layout checkpoint of a micro ConViT with known weights (seed 0, then perturbed off the init)."""
    torch.manual_seed(0)
    model = create_model("convit_tiny", **MICRO)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("weights") / "micro.torch"
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": model.state_dict(), "heads": {}}}}}, path)
    return path, model.eval()


def _features(folder: Path, split: str, feature: str, ranks: int = 1):
    """The shards VISSL's engine wrote (every rank, every chunk), read with numpy and ordered by index."""
    files = sorted(folder.glob(f"rank*_chunk*_{split}_{feature}_features.npy"))
    assert {f.name.split("_")[0] for f in files} == {f"rank{r}" for r in range(ranks)}, files
    feats = np.concatenate([np.load(f) for f in files])
    targets = np.concatenate([np.load(str(f).replace("_features", "_targets")) for f in files])
    inds = np.concatenate([np.load(str(f).replace("_features", "_inds")) for f in files])
    order = np.argsort(inds)
    return feats[order], targets[order].reshape(-1), inds[order]


@pytest.fixture(scope="module")
def knn_run(micro_checkpoint, digits, tmp_path_factory):
    work = tmp_path_factory.mktemp("knn")
    proc = run_tool(
        "nearest_neighbor_test",
        [
            KNN_TWIN,
            *folder_overrides(digits),
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={micro_checkpoint[0]}",
            f"config.CHECKPOINT.DIR={work / 'ck'}",
        ],
        cwd=work,
    )
    return work / "ck", proc.stdout


def test_extraction_on_cpu_is_the_trunk_forward(knn_run, micro_checkpoint, digits):
    """The features VISSL's engine wrote for the val images equal our model's
    forward on the same images, read and transformed independently (PIL, torchvision)."""
    folder, _ = knn_run
    feats, targets, inds = _features(folder, "test", "lastCLS")
    paths = sorted((digits / "val").glob("*/*.png"))  # torchvision ImageFolder order
    assert inds.tolist() == list(range(len(paths)))
    assert targets.tolist() == [int(p.parent.name) for p in paths]
    prepare = transforms.Compose(
        [transforms.Resize(32), transforms.ToTensor(), transforms.Normalize([0.3] * 3, [0.4] * 3)]
    )
    chosen = [0, 100, 358]
    images = torch.stack([prepare(Image.open(paths[i]).convert("RGB")) for i in chosen])
    with torch.no_grad():
        expected = named_features(micro_checkpoint[1], images, ["lastCLS"])[0]
    torch.testing.assert_close(torch.from_numpy(feats[chosen]), expected, atol=1e-5, rtol=1e-5)


def test_knn_benchmark_equals_sklearn(knn_run):
    folder, stdout = knn_run
    results = json.loads((folder / "knn_results.json").read_text())
    assert (results["k"], results["temperature"], results["l2_normalized"]) == (20, 0.07, True)
    for feature in ("lastCLS", "lastPOOL"):
        train_x, train_y, _ = _features(folder, "train", feature)
        test_x, test_y, _ = _features(folder, "test", feature)
        got = results["features"][feature]
        assert (got["num_train"], got["num_test"]) == (1438, 359)
        assert got["top1"] == pytest.approx(_sklearn_knn_top1(train_x, train_y, test_x, test_y), abs=1e-4)
        assert f"{feature}: kNN top-1 {got['top1']:.2f}%" in stdout


@pytest.mark.slow
def test_knn_benchmark_two_processes_agree(knn_run, micro_checkpoint, digits, tmp_path):
    """2 ranks each extract half of each split; the merged result is the 1-process one."""
    run_tool(
        "nearest_neighbor_test",
        [
            KNN_TWIN,
            *folder_overrides(digits),
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={micro_checkpoint[0]}",
            f"config.CHECKPOINT.DIR={tmp_path / 'ck'}",
        ],
        cwd=tmp_path,
    )
    two, one = (json.loads((f / "knn_results.json").read_text()) for f in (tmp_path / "ck", knn_run[0]))
    assert {f: r["top1"] for f, r in two["features"].items()} == {f: r["top1"] for f, r in one["features"].items()}
    feats2, _, inds2 = _features(tmp_path / "ck", "train", "lastCLS", ranks=2)
    feats1, _, inds1 = _features(knn_run[0], "train", "lastCLS")
    assert inds2.tolist() == inds1.tolist()
    np.testing.assert_allclose(feats2, feats1, atol=1e-5)


def test_svm_benchmark_voc07_layout(micro_checkpoint, digits_filelists, tmp_path):
    """Per-class linear SVMs on VOC07-layout filelists: one AP per class, each
    close to scikit-learn's average precision of the saved SVM on the same features."""
    import pickle

    from sklearn.metrics import average_precision_score

    folder = tmp_path / "ck"
    proc = run_tool(
        "train_svm",
        [
            SVM_TWIN,
            *filelist_overrides(digits_filelists, "voc_labels"),
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={micro_checkpoint[0]}",
            f"config.CHECKPOINT.DIR={folder}",
        ],
        cwd=tmp_path,
    )
    results = json.loads((folder / "svm_results.json").read_text())["features"]
    assert set(results) == {"lastCLS", "concatCLS2"}
    test_x, _, _ = _features(folder, "test", "lastCLS")
    labels = np.load(digits_filelists / "test_voc_labels.npy")
    got = results["lastCLS"]
    assert len(got["ap_per_class"]) == 10 and set(got["costs"]) <= {0.1, 1.0}
    assert got["mAP"] == pytest.approx(np.mean(got["ap_per_class"]), abs=1e-3)
    assert got["mAP"] > 25  # 10 balanced classes: chance AP is about 10%
    normalized = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)  # SVM.normalize: true
    for cls, (ap, cost) in enumerate(zip(got["ap_per_class"], got["costs"])):
        with open(folder / "lastCLS" / f"cls{cls}_cost{cost}.pickle", "rb") as f:
            svm = pickle.load(f)
        theirs = average_precision_score(labels[:, cls], svm.decision_function(normalized)) * 100
        assert ap == pytest.approx(theirs, abs=3.0), cls  # VOC's interpolated AP vs scikit-learn's step AP
    assert "lastCLS: SVM test mAP" in proc.stdout


@pytest.mark.parametrize("layout, labels", [("voc07", "voc_labels"), ("places205", "labels")])
def test_low_shot_benchmark(layout, labels, micro_checkpoint, digits_filelists, tmp_path):
    """Low-shot SVMs for every k and sample; more shots give a higher mean mAP."""
    folder = tmp_path / "ck"
    run_tool(
        "train_svm_low_shot",
        [
            f"config=test/convit_ssl/benchmark/low_shot_micro_filelist_{layout}",
            *filelist_overrides(digits_filelists, labels),
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={micro_checkpoint[0]}",
            f"config.CHECKPOINT.DIR={folder}",
        ],
        cwd=tmp_path,
    )
    results = json.loads((folder / "low_shot_results.json").read_text())
    assert results["sample_inds"] == [1, 2]
    small, large = results["k_values"]
    for feature, by_k in results["features"].items():
        assert set(by_k) == {f"k={small}", f"k={large}"}, feature
        for stats in by_k.values():
            assert stats["min"] <= stats["mean"] <= stats["max"] and stats["std"] >= 0
        assert by_k[f"k={large}"]["mean"] > by_k[f"k={small}"]["mean"], feature
    if layout == "places205":  # one filelist per sample and k, drawn from TRAIN
        sample = np.load(folder / f"train_labels_sample1_k{small}.npy")
        assert sorted(np.bincount(sample).tolist()) == [small] * 10


# -------------------------------------------------------- configs, errors
def test_shipped_knn_configs_compose_and_validate_their_model():
    names = sorted(
        p.relative_to(CONFIG_DIR).with_suffix("")
        for p in (CONFIG_DIR / "benchmark" / "nearest_neighbor").glob("*/eval_convit_small_knn_*.yaml")
    )
    assert len(names) == 10  # every linear-eval dataset with a train / val split (not VOC07: multi-label)
    for name in names:
        _, config = compose([f"config={name}"])
        assert config.NEAREST_NEIGHBOR == {"TOPK": 20, "SIGMA": 0.07, "L2_NORM_FEATS": True}, name
        assert config.MODEL.TRUNK.CONVIT_SSL.ARCH == "convit_small"
        assert config.MODEL.FEATURE_EVAL_SETTINGS.EXTRACT_TRUNK_FEATURES_ONLY  # trunk features, not a head's output
        assert config.DATA.TRAIN.TRANSFORMS == config.DATA.TEST.TRANSFORMS, name  # no augmentation
    for name in (
        "low_shot_transfer/voc07/eval_convit_small_low_shot_svm_voc07_224",
        "low_shot_transfer/places205/eval_convit_small_low_shot_svm_places205_224",
    ):
        _, config = compose([f"config=benchmark/{name}"])
        assert config.SVM.low_shot.sample_inds == [1, 2, 3, 4, 5]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convit_ssl.cli", *args], cwd=cwd, text=True, capture_output=True, timeout=120
    )


@pytest.mark.parametrize(
    "command, overrides, message",
    [
        ("knn", ["config.MODEL.FEATURE_EVAL_SETTINGS.EVAL_MODE_ON=false"], "EVAL_MODE_ON must be true"),
        ("knn", ["config.TEST_MODEL=false"], "needs a TEST split"),
        ("svm", ["config.DATA.TRAIN.DATA_PATHS=[/no/such/folder]"], "data folder '/no/such/folder' does not exist"),
    ],
)
def test_benchmark_user_errors(command, overrides, message, digits, tmp_path):
    proc = _cli(
        command, KNN_TWIN, *folder_overrides(digits), *overrides, f"config.CHECKPOINT.DIR={tmp_path}", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr.splitlines()[-1]
    assert not list(tmp_path.glob("*.npy"))  # refused before anything ran
