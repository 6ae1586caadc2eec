"""The network model: structure and keys as the host builds them, initialisation, validation, forward."""

import itertools

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext.network import ACTIVATIONS, activation_names, parse_dropout_structure, usable_activation_names
from tests.support.reference import FUNCTIONS, reference_mlp

ACTIVATION_FAMILIES = [*sorted(FUNCTIONS), "prelu", "linear"]


def expected_keys(structure, activation, layer_norm, dropout, activate_output):
    """Sequential indices by the host's rule, derived here independently of the package."""
    keys, index = [], 0
    count = len(structure) - 1
    for i in range(count):
        keys += [f"linear.{index}.weight", f"linear.{index}.bias"]
        index += 1
        if activation not in (None, "linear") and (i < count - 1 or activate_output):
            if activation == "prelu":
                keys.append(f"linear.{index}.weight")
            index += 1
        if layer_norm:
            keys += [f"linear.{index}.weight", f"linear.{index}.bias"]
            index += 1
        if dropout[i + 1] > 0:
            index += 1
    return sorted(keys)


@pytest.mark.parametrize(
    "structure,activation,layer_norm,dropout,activate_output",
    [
        (s, a, ln, d, ao)
        for (s, d), a, ln, ao in itertools.product(
            [
                ((1, 2, 1), (0, 0, 0)),
                ((1, 2, 1), (0, 0.3, 0)),
                ((1, 2, 2, 1), (0, 0.3, 0, 0)),
                ((1, 2, 2, 1), (0, 0.1, 0.2, 0)),
                ((1, 1.5, 0.5, 1), (0, 0, 0.25, 0)),
                ((1, 2, 1), (0, 0, 0.4)),  # the last entry is read too: dropout after the output layer
            ],
            ["linear", None, "relu", "swish", "prelu"],
            [False, True],
            [False, True],
        )
    ],
)
def test_state_dict_keys_follow_the_host_layer_order(structure, activation, layer_norm, dropout, activate_output):
    net = hx.create(
        [8], structure, activation, layer_norm=layer_norm, dropout_structure=dropout, activate_output=activate_output
    )
    for module in net.layers[8]:
        assert sorted(module.state_dict()) == expected_keys(structure, activation, layer_norm, dropout, activate_output)


def test_default_network_matches_a1111_defaults():
    net = hx.create(seed=0)
    assert net.widths == [768, 320, 640, 1280]
    assert sorted(net.layers[768][0].state_dict()) == [
        "linear.0.bias",
        "linear.0.weight",
        "linear.1.bias",
        "linear.1.weight",
    ]
    assert net.layers[768][0].linear[0].weight.shape == (1536, 768)
    assert net.family == "sd1"
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_float_structure_uses_int_of_width_times_factor():
    net = hx.create([10], (1, 1.55, 0.33, 1))
    linears = [m for m in net.layers[10][0].linear if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 15), (15, 3), (3, 10)]


def test_activation_table_has_historical_names_and_every_torch_activation():
    assert ACTIVATIONS["swish"] is torch.nn.Hardswish
    assert ACTIVATIONS["hardswish"] is torch.nn.Hardswish
    assert ACTIVATIONS["silu"] is torch.nn.SiLU
    for name in ("relu", "leakyrelu", "elu", "tanh", "sigmoid", "gelu", "mish", "prelu", "softplus", "celu"):
        assert name in ACTIVATIONS
    names = activation_names()
    assert names[:7] == ["linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid"]
    usable = usable_activation_names()
    for broken in ("threshold", "glu", "multiheadattention"):
        assert broken in names and broken not in usable


@pytest.mark.parametrize("activation", ACTIVATION_FAMILIES)
def test_forward_equals_reference_for_every_activation_family(activation):
    net = hx.create([12], (1, 2, 1), activation, "XavierNormal", layer_norm=True, activate_output=True, seed=3)
    _spread_layer_norms(net)
    x = torch.randn(2, 5, 12)
    for module in net.layers[12]:
        ref = reference_mlp(module.state_dict(), (1, 2, 1), activation, True, (0, 0, 0), True)
        torch.testing.assert_close(module(x, multiplier=0.7), x + 0.7 * ref(x), rtol=1e-5, atol=1e-6)


def _spread_layer_norms(net):
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)


def test_training_mode_ignores_multiplier_and_uses_dropout_eval_does_not():
    net = hx.create([16], (1, 4, 1), "relu", "XavierNormal", dropout_structure=(0, 0.5, 0), seed=1)
    module = net.layers[16][0]
    x = torch.randn(4, 16)
    eval_a, eval_b = module(x, 0.3), module(x, 0.3)
    assert torch.equal(eval_a, eval_b)
    assert not torch.allclose(eval_a, x + module.linear(x))  # multiplier used
    net.train()
    assert all(p.requires_grad for p in net.parameters())
    torch.manual_seed(0)
    train_a = module(x, 0.3)
    torch.manual_seed(1)
    train_b = module(x, 0.3)
    assert not torch.equal(train_a, train_b)  # dropout active
    net.eval()
    torch.testing.assert_close(module(x, 1.0), eval_a + 0.7 * (module(x, 1.0) - x))


def test_normal_init_and_layer_norm_quirk():
    net = hx.create([256], (1, 2, 1), "relu", "XavierUniform", layer_norm=True, seed=5)
    layers = net.layers[256][0].linear
    linear, norm = layers[0], layers[2]
    assert isinstance(norm, torch.nn.LayerNorm)
    # LayerNorm weights are drawn N(0, 0.01) whatever the chosen scheme (A1111's quirk)
    assert abs(norm.weight.std().item() - 0.01) < 0.003 and torch.count_nonzero(norm.bias) == 0
    bound = (6 / (256 + 512)) ** 0.5
    assert linear.weight.abs().max() <= bound and linear.weight.std() > bound / 3
    assert torch.count_nonzero(linear.bias) == 0


def test_prelu_starts_from_torchs_value_not_from_uninitialised_memory():
    torch.empty(1 << 16).fill_(float("nan"))  # freed memory full of NaN, as a previous allocation may leave it
    net = hx.create([12, 8], (1, 2, 1), "prelu", seed=3)
    slopes = [
        layer.weight for pair in net.layers.values() for m in pair for layer in m.linear if hasattr(layer, "init")
    ]
    assert len(slopes) == 2 * 2 and all(torch.equal(w, torch.full_like(w, 0.25)) for w in slopes)


@pytest.mark.parametrize(
    "scheme,expected_std",
    [("Normal", 0.01), ("XavierNormal", (2 / (384 + 768)) ** 0.5), ("KaimingNormal", (2 / 384) ** 0.5)],
)
def test_init_schemes_have_their_statistics(scheme, expected_std):
    net = hx.create([384], (1, 2, 1), "relu", scheme, seed=9)
    weight = net.layers[384][0].linear[0].weight
    assert abs(weight.std().item() - expected_std) / expected_std < 0.05


def test_seed_makes_creation_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(42)
    before = torch.get_rng_state()
    a = hx.create([32], seed=7, weight_init="KaimingUniform", activation="leakyrelu")
    assert torch.equal(before, torch.get_rng_state())
    b = hx.create([32], seed=7, weight_init="KaimingUniform", activation="leakyrelu")
    c = hx.create([32], seed=8, weight_init="KaimingUniform", activation="leakyrelu")
    assert hx.content_hash(a) == hx.content_hash(b) != hx.content_hash(c)
    assert not torch.equal(a.layers[32][0].linear[0].weight, a.layers[32][1].linear[0].weight)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layer_structure": (2, 2, 1)}, "must start and end with 1"),
        ({"layer_structure": (1, 2, 3)}, "must start and end with 1"),
        ({"layer_structure": (1,)}, "at least two"),
        ({"layer_structure": (1, -2, 1)}, "positive"),
        ({"layer_structure": (1, 0.01, 1)}, "width 0"),
        ({"widths": [0]}, "positive integer"),
        ({"widths": [-320]}, "positive integer"),
        ({"widths": []}, "at least one width"),
        ({"widths": [320, 320]}, "same width twice"),
        ({"dropout_structure": (0, 1.0, 0)}, "[0, 1)"),
        ({"dropout_structure": (0, -0.1, 0)}, "[0, 1)"),
        ({"dropout_structure": (0, 0.1)}, "entries"),
        ({"activation": "threshold"}, "cannot be built"),
        ({"activation": "glu"}, "changes the shape"),
        ({"activation": "multiheadattention"}, "cannot be built"),
        ({"activation": "swishy"}, "unknown activation 'swishy'"),
        ({"weight_init": "Uniform"}, "weight initialisation"),
    ],
)
def test_invalid_parameters_are_explained(kwargs, message):
    params = {"widths": [64]} | kwargs
    with pytest.raises(hx.InvalidConfigError) as caught:
        hx.create(**params)
    assert message in str(caught.value)


def test_legacy_dropout_rule():
    assert parse_dropout_structure([1, 2, 1], False, True) == [0, 0, 0]
    assert parse_dropout_structure([1, 2, 1], True, False) == [0, 0, 0]
    assert parse_dropout_structure([1, 2, 1], True, True) == [0, 0.3, 0]
    assert parse_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]
    assert parse_dropout_structure([1, 2, 4, 2, 1], True, True) == [0, 0.3, 0.3, 0.3, 0]


def test_describe_lists_the_facts():
    net = hx.create([2048, 640, 1280], (1, 2, 1), "relu", name="xl")
    text = net.describe()
    assert "widths: 2048, 640, 1280" in text and "SDXL" in text and "activation: relu" in text
    assert f"parameters: {net.parameter_count():,}" in text


SCHEMES = ["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"]
NN_INIT = {
    "Normal": lambda w, g: torch.nn.init.normal_(w, 0.0, 0.01, generator=g),
    "XavierUniform": lambda w, g: torch.nn.init.xavier_uniform_(w, generator=g),
    "XavierNormal": lambda w, g: torch.nn.init.xavier_normal_(w, generator=g),
    "KaimingUniform": lambda w, g: torch.nn.init.kaiming_uniform_(w, nonlinearity="relu", generator=g),
    "KaimingNormal": lambda w, g: torch.nn.init.kaiming_normal_(w, nonlinearity="relu", generator=g),
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_seeded_creation_draws_what_torch_nn_init_draws(scheme):
    """The numbers of A1111's initialisation (``torch.nn.init`` per scheme; a LayerNorm's weight is
    drawn like a Linear's under Normal), from the seed's generator, leaving the global RNG alone."""
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    net = hx.create([16, 8], (1, 2, 1), "relu", scheme, layer_norm=True, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    generator = torch.Generator().manual_seed(7)
    for key_module, value_module in net.layers.values():
        for module in (key_module, value_module):
            for layer in module.linear:
                if isinstance(layer, torch.nn.Linear):
                    expected = NN_INIT[scheme](torch.empty_like(layer.weight), generator)
                elif isinstance(layer, torch.nn.LayerNorm):
                    expected = NN_INIT["Normal"](torch.empty_like(layer.weight), generator)
                else:
                    continue
                assert torch.equal(layer.weight, expected)
                assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_create_and_load_while_a1111_loads_a_checkpoint(monkeypatch, tmp_path):
    """Found in the real A1111: GET /hypernetworks/v1/networks during a checkpoint load answered 500,
    because A1111 had replaced ``Module.load_state_dict`` by a wrapper without ``assign``."""
    from tests.support.a1111_loading import a1111_checkpoint_loading

    reference = hx.create([16, 8], (1, 2, 1), "relu", "XavierUniform", layer_norm=True, seed=3)
    hx.save(reference, tmp_path / "net.pt")
    hx.save(reference, tmp_path / "net.safetensors")
    checkpoint = {"linear.0.weight": torch.full((32, 16), 7.0)}  # a checkpoint key our modules also have
    with a1111_checkpoint_loading(monkeypatch, checkpoint):
        created = hx.create([16, 8], (1, 2, 1), "relu", "XavierUniform", layer_norm=True, seed=3)
        loaded = [hx.load(tmp_path / "net.pt"), hx.load(tmp_path / "net.safetensors")]
    assert "linear.0.weight" in checkpoint  # not taken by our loads
    for net in (created, *loaded):
        assert all(p.device.type == "cpu" for p in net.parameters())
        for a, b in zip(net.state_dict().values(), reference.state_dict().values(), strict=True):
            assert torch.equal(a, b)
