"""The regularizer comparison, run tiny on real Fashion-MNIST: its table, its ||J||_F values
against torch.autograd.functional.jacobian, and the Jacobian penalty's effect."""

import pytest
import torch

from conftest import requires_fashion_mnist
from dnn_tricks.experiments.regularizers import Setting, run

pytestmark = requires_fashion_mnist()

# lambda_JR far above the full run's 0.01: in 15 steps from a small-Jacobian init the
# default strength barely moves ||J||_F (0.58 vs 0.51), while 10 roughly halves it.
TINY = {"none": Setting(), "Jacobian": Setting(jacobian=10.0)}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("regularizers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DNN_TRICKS_CACHE", str(out / "cache"))  # unpacked IDX files stay in tmp
        rows = run(
            settings=TINY,
            epochs=1,
            train_size=500,
            batch_size=32,
            jacobian_images=50,
            out=out,
            keep_models=True,
        )
    return {r["setting"]: r for r in rows}, out


def test_table_has_one_row_per_setting_with_its_numbers(result):
    rows, out = result
    lines = (out / "regularizers.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["setting", "regularizers", "test acc (%)", "mean test ‖J‖_F", "train s"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:4]]
    assert [cells[0] for cells in body] == list(TINY)
    for cells in body:
        row = rows[cells[0]]
        assert float(cells[2]) == pytest.approx(100 * row["test_acc"], abs=0.006)
        assert float(cells[3]) == pytest.approx(row["jacobian_norm"], rel=2e-3)
    assert body[1][1] == "Jacobian lambda 10, 1 projection"


def test_accuracy_is_on_the_real_test_split(result):
    rows, _ = result
    for row in rows.values():
        assert row["test_images"] == 10000 and row["train_images"] == 500
        assert row["steps"] == 500 // 32  # one epoch, ragged last batch dropped
        assert row["test_acc"] > 0.35  # chance is 0.10; a label mix-up would land there


def test_jacobian_norms_match_autograd_reference(result):
    rows, _ = result
    for row in rows.values():
        net, x = row["model"].net.eval(), row["jacobian_inputs"]
        assert x.shape == (50, 1, 28, 28)
        reference = [
            torch.autograd.functional.jacobian(net, sample[None], vectorize=True).norm()
            for sample in x
        ]
        assert row["jacobian_norm"] == pytest.approx(float(torch.stack(reference).mean()), 1e-4)


def test_jacobian_penalty_shrinks_the_jacobian(result):
    rows, _ = result
    assert rows["Jacobian"]["jacobian_norm"] < 0.7 * rows["none"]["jacobian_norm"]


def test_unknown_setting_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"settings=\['l3'\] unknown; choose from: none, L2"):
        run(settings=["none", "l3"], out=tmp_path)
