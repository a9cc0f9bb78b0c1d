"""Bundled example trials: reproducible from their script, valid, and read back as written."""

import runpy
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from itpk import load_model, read_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "make_example_data.py"
EXAMPLES = [("example_it_vs_iv", "it_antibody"), ("example_virus", "it_oncolytic_virus")]


@pytest.mark.skipif(not SCRIPT.exists(), reason="generator script lives in the source tree only")
def test_script_reproduces_bundled_files(tmp_path):
    runpy.run_path(str(SCRIPT))["write_all"](tmp_path)
    for name, _ in EXAMPLES:
        bundled = files("itpk.data") / f"{name}.csv"
        assert (tmp_path / f"{name}.csv").read_text() == bundled.read_text(), name


@pytest.mark.parametrize(("name", "model"), EXAMPLES)
def test_round_trip_keeps_every_event(name, model):
    path = Path(str(files("itpk.data") / f"{name}.csv"))
    raw = pd.read_csv(path)
    data = read_dataset(path, load_model(model)).data
    assert len(data) == len(raw)
    np.testing.assert_array_equal(data["ID"], raw["ID"])
    np.testing.assert_allclose(data["TIME"], raw["TIME"], rtol=0)  # sidecar says h: no conversion
    np.testing.assert_array_equal(data["EVID"], raw["EVID"])
    doses = raw["EVID"] == 1
    np.testing.assert_allclose(data.loc[doses, "AMT"], raw.loc[doses, "AMT"], rtol=1e-15)
    assert list(data.loc[doses, "ROUTE"]) == list(raw.loc[doses, "ROUTE"])
    obs = raw["EVID"] == 0
    np.testing.assert_allclose(data.loc[obs, "DV"], raw.loc[obs, "DV"], rtol=1e-12)  # ug/mL, ug/g -> mg/L: x 1
    assert list(data.loc[obs, "CMT"]) == list(raw.loc[obs, "CMT"])
    np.testing.assert_array_equal(data.loc[obs, "BLQ"].astype(int), raw.loc[obs, "BLQ"])


def test_it_vs_iv_design():
    data = read_dataset(Path(str(files("itpk.data") / "example_it_vs_iv.csv")), load_model("it_antibody"))
    frame = data.data
    assert set(frame["ARM"]) == {"IV", "IT"}
    assert frame.loc[frame["EVID"] == 0, "BLQ"].astype(int).sum() > 0  # some plasma values BLQ
    biopsies = frame[(frame["CMT"] == "tumor")]
    assert set(biopsies["ARM"]) == {"IT"} and biopsies.groupby("ID").size().max() <= 2
