"""The trained reference DiTs (zoo/reference.py, weights in zoo/weights/): their samples are recognisable
digits, their TorchScript exports match torch in onnxruntime, their conditioning is valid `--calib` input.

Sampling runs with one torch thread: on a busy 2-core machine two OpenMP threads are many times slower.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
pytest.importorskip("safetensors")
ort = pytest.importorskip("onnxruntime")

from omnicache_export.zoo.reference import (  # noqa: E402
    NULL_CLASS, REFERENCES, digit_classifier, digit_images, export_reference, frechet_distance, load_reference,
    write_calib_npz,
)

from conftest import max_rel_err, run_ort  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
NAMES = list(REFERENCES)
MIN_ACCURACY = 0.90


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(name) -> path of the reference's TorchScript export, made once per module."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = export_reference(name, tmp_path_factory.mktemp(name) / "model.onnx")
        return made[name]

    return get


def test_classifier_on_real_digits():
    images, labels = digit_images()
    assert images.shape == (1797, 1, 8, 8) and images.min() == -1.0 and images.max() == 1.0
    clf = digit_classifier()
    assert clf.accuracy(images, labels) >= 0.99
    feats = clf.features(images[:50])
    assert feats.shape == (50, 64)
    assert clf.features(images[:50], kind="classifier").shape == (50, 10)
    # Fréchet distance in the PCA feature space: ~0 for the same set, large for noise
    real = clf.features(images)
    assert frechet_distance(real, real) < 1e-6
    noise = clf.features(np.random.default_rng(0).uniform(-1, 1, (500, 64)))
    assert frechet_distance(real, noise) > 10 * frechet_distance(real[::2], real[1::2])


@pytest.mark.parametrize("name", NAMES)
def test_samples_are_the_requested_digits(name):
    ref = load_reference(name)
    assert not ref.model.training
    labels = np.repeat(np.arange(10), 4)  # 40 samples, 4 per class
    x = ref.sample_torch(labels, seed=0)  # the default sampler, steps and guidance
    assert x.shape == (40, *ref.latent_shape)
    digits = ref.digits(x)  # [40, F, 1, 8, 8]
    pred = digit_classifier().predict(digits.reshape(-1, 1, 8, 8)).reshape(40, -1)
    accuracy = float((pred == labels[:, None]).mean())
    assert accuracy >= MIN_ACCURACY, f"{name}: {accuracy:.3f} of {pred.size} digits classified as their label"


@pytest.mark.parametrize("name", NAMES)
def test_torchscript_export_matches_torch(name, exported):
    ref = load_reference(name)
    path = exported(name)
    feeds = ref.example_inputs(labels=(0, 4, 9), seed=1)  # batch 3: not the traced batch (2)
    got = run_ort(path, feeds)[ref.output_name]
    want = ref.run(feeds)
    assert got.shape == want.shape == (3, *ref.latent_shape)
    assert max_rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_conditioning_is_calib_format(name, tmp_path, exported):
    from omnicache_export.runtime.conditioning import load_conditioning
    from omnicache_export.graph.modelio import load_model
    from omnicache_export.graph.roles import guess_roles

    ref = load_reference(name)
    labels = np.array([1, 2, 3, 5, 8])
    cond, uncond = ref.conditioning(labels)
    assert set(cond) == set(uncond) == set(ref.input_names) - {"hidden_states", "timestep"}
    for key in cond:
        assert cond[key].shape[0] == uncond[key].shape[0] == 5
    if "class_labels" in cond:
        assert cond["class_labels"].dtype == np.int64 and (uncond["class_labels"] == NULL_CLASS).all()
    else:
        e = cond["encoder_hidden_states"]
        assert e.dtype == np.float32 and e.shape == (5, 8, 32)
        assert not np.allclose(e[0], e[1])  # a distinct caption per class
    onnx_path = exported(name)
    npz = write_calib_npz(name, labels, tmp_path / "calib.npz")
    io = guess_roles(load_model(onnx_path))
    assert [s.role for s in io if s.name in ("hidden_states", "timestep")] == ["latent", "timestep"]
    loaded = load_conditioning(npz, io, guidance=True)
    assert loaded.n_samples == 5
    for key in cond:
        np.testing.assert_array_equal(loaded.cond[key], cond[key])
        np.testing.assert_array_equal(loaded.uncond[key], uncond[key])
