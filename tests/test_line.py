"""A line: one served model for many products, on a real tritonserver on 127.0.0.1 (CPU Python models).

Four real anomalib PatchCore checkpoints: three resnet18 trained under one seed (the same frozen backbone weights)
on three different generated data sets, and one resnet18 under another seed (the same timm name, other weights:
grouping must go by content). Each product's served results are compared bit for bit with the checkpoint served
alone and with in-process predict; products are added, replaced and removed while other products are scored, a
bad checkpoint is refused, and a version that fails to load leaves the old one serving. Every wait is bounded.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line, run_cli
from test_serve_faults import Serving, _wait_until

from patchcore_trt.demo.training import TrainSettings, train_patchcore
from patchcore_trt.images import collect_images, decode_image
from patchcore_trt.line.model import Line
from patchcore_trt.line.products import read_manifest
from patchcore_trt.runtime import open_backend
from patchcore_trt.serve.repository import parse_config
from patchcore_trt.synthetic_data import make_synthetic_dataset

FIELDS = ("pred_score", "pred_label", "anomaly_map", "pred_mask")
LOAD_TIMEOUT_S = 180


def _same(left, right) -> bool:
    return all(np.array_equal(getattr(left, name), getattr(right, name)) for name in FIELDS)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("line_products")


@pytest.fixture(scope="module")
def products(work: Path) -> dict[str, Path]:
    """name -> checkpoint: a, b, c share backbone weights (seed 0) on different data; d has other weights (seed 1)."""
    found = {}
    for name, data_seed, seed in (("a", 1, 0), ("b", 2, 0), ("c", 3, 0), ("d", 1, 1)):
        data = make_synthetic_dataset(work / f"data{data_seed}", n_train=6, n_test_good=2, n_test_defect=2,
                                      size=(160, 180), seed=data_seed)  # fmt: skip
        settings = TrainSettings(backbone="resnet18", image_size=(128, 128), seed=seed)
        found[name] = train_patchcore(data, work / f"train_{name}", settings)
    return found


@pytest.fixture(scope="module")
def frames(products: dict[str, Path], work: Path) -> np.ndarray:
    """uint8 frames [8, 160, 180, 3] of two of the data sets (good and defective)."""
    paths, _ = collect_images([str(work / "data1" / "test"), str(work / "data2" / "test")])
    return np.stack([decode_image(path) for path in paths])


@pytest.fixture(scope="module")
def reference(products: dict[str, Path], frames: np.ndarray) -> dict[str, object]:
    """In-process predict of each checkpoint on every frame: the torch backend, the FP32 reference."""
    return {name: open_backend(path).predict(frames) for name, path in products.items()}


@pytest.fixture(scope="module")
def repository(products: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """REPO/line serving a, b and d (c is added later), and REPO/single_a serving a's checkpoint alone."""
    repo = tmp_path_factory.mktemp("line_repo")
    result = run_cli("triton", f"a={products['a']}", f"b={products['b']}", f"d={products['d']}", "-o", repo,
                     "--name", "line")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "line version 1: 3 products, 2 backbone group(s)" in result.stdout, result.stdout
    result = run_cli("triton", products["a"], "-o", repo, "--name", "single_a")
    assert result.returncode == 0, result.stderr
    return repo


def test_products_share_a_backbone_by_weights_and_score_as_their_checkpoints(products, frames, reference, tmp_path):
    folder = tmp_path / "version"
    folder.mkdir()
    from patchcore_trt.line.store import write_version

    manifest = write_version(folder, [(name, path) for name, path in products.items()])
    groups = {name: product.group for name, product in manifest.products.items()}
    assert groups["a"] == groups["b"] == groups["c"] != groups["d"]
    assert sorted(p.name for p in (folder / "backbones").iterdir()) == sorted(
        f"{g}.safetensors" for g in {*groups.values()}
    )
    line = Line(folder)
    assert line.models["a"].backbone is line.models["b"].backbone is line.models["c"].backbone
    assert line.models["d"].backbone is not line.models["a"].backbone
    # One call with every product interleaved: the backbone runs once per group on the merged batch.
    items = [("a", frames[0:2]), ("d", frames[2:5]), ("b", frames[5:6]), ("c", frames[6:8]), ("a", frames[4:8])]
    results = line.run(items)
    for (name, batch), result in zip(items, results, strict=True):
        alone = open_backend(products[name]).predict(batch)
        assert _same(result, alone) and np.array_equal(result.raw_score, alone.raw_score), name
    # The bank is the .npy file mapped into memory, not a copy of it.
    address = line.models["a"].search.bank.data_ptr()
    bank_file = str((folder / "banks" / "a.npy").resolve())
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(bank_file)]
    spans = [tuple(int(value, 16) for value in fields[0].split("-")) for fields in maps]
    assert any(low <= address < high for low, high in spans), (hex(address), maps)


def test_mixed_traffic_equals_single_serving_and_in_process(repository, products, frames, reference):
    serving = Serving.start(repository)
    try:
        grpc = f"grpc://127.0.0.1:{serving.ports[1]}"
        results: dict[tuple[str, int], object] = {}
        errors: list[str] = []

        def client(name: str) -> None:
            backend = open_backend(grpc, model="line", product=name)
            try:
                for round_ in range(6):
                    results[name, round_] = backend.predict(frames)
            except Exception as exc:  # recorded, then asserted empty: a failure must not hide in a thread
                errors.append(f"{name}: {exc}")
            finally:
                backend.close()

        stop, unknown = threading.Event(), []  # a client asking for a product the line does not serve, meanwhile
        stranger = threading.Thread(
            target=_score_until, args=(f"127.0.0.1:{serving.ports[1]}", "zz", frames, stop, unknown)
        )
        threads = [threading.Thread(target=client, args=(name,)) for name in ("a", "b", "d")]
        for thread in [stranger, *threads]:
            thread.start()
        for thread in threads:
            thread.join(timeout=LOAD_TIMEOUT_S)
        stop.set()
        stranger.join(timeout=LOAD_TIMEOUT_S)
        assert not errors and len(results) == 18, errors
        assert unknown and {entry[3] for entry in unknown} == {"line: unknown product 'zz'; this line serves: a, b, d"}
        for (name, _), result in results.items():
            assert _same(result, reference[name]), name
        single = open_backend(grpc, model="single_a").predict(frames)
        assert _same(single, reference["a"])
        described = open_backend(grpc, model="line", product="d").describe()
        assert (
            described["product"] == "d"
            and described["source_sha256"] == read_manifest(repository / "line" / "1").products["d"].sha256
        )
        # Requests of different products were merged into one execution: each client sends one request at a time,
        # one product each, so any execution holding two requests held two products.
        statistics = serving_statistics(serving, "line")
        assert statistics["execution_count"] < statistics["inference_stats"]["success"]["count"], statistics
    finally:
        serving.process.terminate()
        serving.finish()


def serving_statistics(serving: Serving, model: str) -> dict:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(serving.url)
    try:
        return client.get_inference_statistics(model)["model_stats"][0]
    finally:
        client.close()


def _score_until(url: str, name: str, frames: np.ndarray, stop: threading.Event, log: list) -> None:
    """Score ``name`` one frame pair at a time until ``stop`` (at most 400 requests): (sha256, scores) or the error."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        for count in range(400):
            if stop.is_set():
                break
            batch = frames[count % 4 * 2 : count % 4 * 2 + 2]
            image = grpcclient.InferInput("image", list(batch.shape), "UINT8")
            image.set_data_from_numpy(batch)
            try:
                result = client.infer("line", [image], parameters={"product": name})
            except grpcclient.InferenceServerException as exc:
                log.append((name, count % 4, None, exc.message()))
                continue
            sha = bytes(result.as_numpy("product_sha256")[0]).hex()
            log.append((name, count % 4, sha, result.as_numpy("pred_score").reshape(-1)))
    finally:
        client.close()


def test_products_added_replaced_and_removed_while_others_are_scored(repository, products, frames, reference):
    sha = {name: read_manifest_of(path) for name, path in products.items()}
    serving = Serving.start(repository)
    try:
        url = f"127.0.0.1:{serving.ports[1]}"
        stop, log = threading.Event(), []
        threads = [threading.Thread(target=_score_until, args=(url, name, frames, stop, log)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        try:
            steps = (
                (("--add", f"c={products['c']}"), 2),
                (("--replace", f"b={products['d']}"), 3),
                (("--remove", "d"), 4),
            )
            for change, number in steps:
                result = run_cli("triton", *change, repository, "--name", "line")
                assert result.returncode == 0, result.stderr
                line = f"model line: version {number} is serving (version {number - 1} unloaded)"
                assert _wait_until(lambda line=line: line in serving.err, LOAD_TIMEOUT_S), serving.err
            time.sleep(1.0)  # a few more answers from the last version
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=LOAD_TIMEOUT_S)
        failed = [entry for entry in log if entry[2] is None]
        assert not failed, failed[:3]
        for name, pair, source, scores in log:
            # Each answer is the result of the checkpoint it names: a's throughout, b's then d's for product b.
            owner = next(product for product, value in sha.items() if value == source)
            assert owner == name or (name, owner) == ("b", "d"), (name, owner)
            assert np.array_equal(scores, reference[owner].pred_score[pair * 2 : pair * 2 + 2]), (name, owner, pair)
        assert {entry[2] for entry in log if entry[0] == "b"} == {sha["b"], sha["d"]}
        assert sum(1 for entry in log if entry[0] == "a") >= 4
        # The product list clients read follows the version served.
        config = parse_config(repository / "line" / "config.pbtxt")
        listed = json.loads(config.parameters["products"].string_value)
        assert {name: item["sha256"] for name, item in listed.items()} == {"a": sha["a"], "b": sha["d"], "c": sha["c"]}
        assert sorted(p.name for p in (repository / "line").iterdir() if p.is_dir()) == ["3", "4"]
        grpc = f"grpc://{url}"
        assert _same(open_backend(grpc, model="line", product="c").predict(frames), reference["c"])
        assert _same(open_backend(grpc, model="line", product="b").predict(frames), reference["d"])
        removed = run_cli(
            "predict", "--server", grpc, "--model", "line", "--product", "d", frames_dir(repository, frames)
        )
        assert error_line(removed) == f"error: {grpc} model 'line': unknown product 'd'; it serves: a, b, c"
    finally:
        serving.process.terminate()
        serving.finish()


def read_manifest_of(checkpoint: Path) -> str:
    from patchcore_trt.files import sha256_of

    return sha256_of(checkpoint)


def frames_dir(repository: Path, frames: np.ndarray) -> Path:
    """The frames as PNG files beside the repository (for the command line)."""
    from PIL import Image

    folder = repository.parent / "frames"
    folder.mkdir(exist_ok=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame{index}.png")
    return folder


def test_a_bad_checkpoint_is_refused_and_a_version_that_fails_to_load_leaves_the_old_one(repository, frames, reference):
    bad = repository.parent / "bad.ckpt"
    bad.write_bytes(b"PK not a checkpoint")
    before = sorted(p.name for p in (repository / "line").iterdir())
    result = run_cli("triton", "--add", f"e={bad}", repository, "--name", "line")
    assert error_line(result).startswith(f"error: product e: {bad}:"), result.stderr
    assert sorted(p.name for p in (repository / "line").iterdir()) == before  # no version, no staging folder left

    serving = Serving.start(repository)
    try:
        folder = repository / "line"
        served = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
        config_before = (folder / "config.pbtxt").read_text()
        # A version damaged on disk after it was written (a truncated bank): it is moved into place whole.
        staged = folder / ".damaged"
        shutil.copytree(folder / str(served), staged)
        bank = next((staged / "banks").iterdir())
        bank.write_bytes(bank.read_bytes()[:1000])
        staged.rename(folder / str(served + 1))
        expected = f"version {served} keeps serving"
        assert _wait_until(lambda: any(expected in line for line in serving.err), LOAD_TIMEOUT_S), serving.err
        warning = next(line for line in serving.err if expected in line)
        assert f"model line (version {served + 1}): UNAVAILABLE" in warning, warning
        assert (folder / f".{served + 1}.failed").is_dir() and not (folder / str(served + 1)).exists()
        assert (folder / "config.pbtxt").read_text() == config_before
        answer = open_backend(f"grpc://127.0.0.1:{serving.ports[1]}", model="line", product="a").predict(frames)
        assert _same(answer, reference["a"])
    finally:
        serving.process.terminate()
        serving.finish()


def test_line_command_mistakes_are_one_line_each(repository, products, tmp_path):
    """Each refused before any checkpoint is read or anything written."""
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(products["a"], folder / "bolt.ckpt")
    shutil.copy(products["b"], folder / "nut.ckpt")
    empty = tmp_path / "empty"
    empty.mkdir()
    line = repository / "line"
    cases = {
        ("triton", f"x={products['a']}", f"x={products['b']}", "-o", tmp_path / "r"):
            f"error: product 'x' is named twice ({products['a']} and {products['b']}); name them with NAME=PATH",
        ("triton", folder, empty, "-o", tmp_path / "r"): (
            f"error: {empty}: is a folder holding no .ckpt checkpoint; expected a model file, or a folder of .ckpt "
            "files (one product each)"
        ),
        ("triton", f".hidden={products['a']}", folder, "-o", tmp_path / "r"):
            "error: product name '.hidden' must be 1-64 letters, digits, '_', '.' or '-' (not starting '.' or '-')",
        ("triton", folder, "-o", tmp_path / "r", "--mode", "fast"):
            "error: --mode: for one checkpoint on the cuda backend; a line runs every product in FP32 (anomalib's "
            "arithmetic) on its instances",
        ("triton", "--replace", str(products["a"]), repository, "--name", "line"):
            f"error: --replace takes NAME=PATH, got {products['a']}",
        ("triton", "--remove", "zz", repository, "--name", "line"):
            f"error: {line}: has no product(s) zz; it serves {', '.join(read_manifest(newest(line)).products)}",
        ("triton", "--add", f"a={products['a']}", repository, "--name", "line"):
            f"error: {line}: already serves a; replace it with --replace NAME=PATH",
        ("triton", "--add", f"z={products['a']}", repository, "--name", "single_a"):
            f"error: {repository / 'single_a'}: serves one model file, not a line of products; --add/--replace/"
            "--remove need one",
    }  # fmt: skip
    before = sorted(p.name for p in line.iterdir())
    for args, expected in cases.items():
        assert error_line(run_cli(*args)) == expected, args
    assert sorted(p.name for p in line.iterdir()) == before
    assert not (tmp_path / "r").exists()
    # A folder of checkpoints is a line named after its files.
    result = run_cli("triton", folder, "-o", tmp_path / "r", "--name", "pair")
    assert result.returncode == 0, result.stderr
    assert list(read_manifest(tmp_path / "r" / "pair" / "1").products) == ["bolt", "nut"]


def newest(folder: Path) -> Path:
    return folder / str(max(int(p.name) for p in folder.iterdir() if p.name.isdigit()))
