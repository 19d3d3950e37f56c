"""The terminal table at 80 columns keeps what matters: row labels whole on one line, numbers
before optional columns, an all-n/a column dropped first, config columns folded and then dropped
before any label is touched; an option left at its default shows the default's value."""
from __future__ import annotations

import io

from gptlab.cli.table import print_compare
from gptlab.results.compare import compare_table
from gptlab.results.frame import load_results

from helpers import make_experiment

LABELS = ("pre_ln", "post_ln", "post_ln_warmup", "post_ln_warmup_with_a_long_name")


def four_variants(tmp_path):
    models = {"pre_ln": {"position": {"name": "rope"}},
              "post_ln": {"position": {"name": "rope", "base": 500.0}, "norm_placement": "post"},
              "post_ln_warmup": {"position": {"name": "rope"}, "norm_placement": "post", "norm": "rmsnorm"},
              "post_ln_warmup_with_a_long_name": {"position": {"name": "rope", "base": 20000.0},
                                                   "norm_placement": "post", "activation": "swiglu"}}
    arms = {label: [1.0 + i / 10, 1.05 + i / 10, 1.1 + i / 10] for i, label in enumerate(LABELS)}
    return make_experiment(tmp_path, "wide", arms, **{label: {"model": m} for label, m in models.items()})


def rendered(exp, width: int) -> list[str]:
    out = io.StringIO()
    print_compare([exp], file=out, width=width)
    return out.getvalue().splitlines()


def body(lines: list[str]) -> list[str]:
    """The table's rows: the lines between its header rule and the first note."""
    start = next(i for i, line in enumerate(lines) if line.startswith("─"))
    end = next(i for i, line in enumerate(lines) if line.startswith("val_loss: mean"))
    return lines[start + 1:end]


def notes(lines: list[str]) -> str:
    end = next(i for i, line in enumerate(lines) if line.startswith("val_loss: mean"))
    return " ".join(" ".join(lines[end:]).split())


def test_labels_are_never_cut_wrapped_or_dropped_at_80_columns(tmp_path):
    exp = four_variants(tmp_path)
    for width in (80, 64):
        lines = rendered(exp, width)
        rows = body(lines)
        assert [line.split(" ")[0] for line in rows] == list(LABELS), "\n".join(lines)  # one line each, whole
        assert all(len(line) <= width for line in lines), "\n".join(lines)
        header = next(line for line in lines if line.startswith("variant"))
        assert "val_loss" in header and "n" in header.split()  # the essential numbers stay
        if width == 80:  # at 80 the numbers fit whole beside the longest label (narrower, they are cut, not it)
            assert " 3/3 " in rows[0] and "1.0500 ± 0.0500" in rows[0] and "baseline" in rows[0]


def test_an_all_na_column_goes_before_a_column_with_numbers(tmp_path):
    exp = four_variants(tmp_path)
    lines = rendered(exp, 80)
    hidden = notes(lines).partition("hidden at width 80: ")[2]
    header = next(line for line in lines if line.startswith("variant"))
    assert "MFU" in hidden and "MFU" not in header  # nothing measured (CPU runs): dropped
    header = next(line for line in rendered(exp, 400) if line.startswith("variant"))
    assert "MFU" in header and "tok/s" in header  # with room, every column
    for width in range(70, 200, 2):  # at no width does the n/a column stand while one with numbers is hidden
        lines = rendered(exp, width)
        header = next(line for line in lines if line.startswith("variant"))
        hidden = notes(lines).partition(f"hidden at width {width}: ")[2].partition(" (see them")[0]
        with_numbers = [c for c in hidden.split(", ") if c and c not in ("MFU", "peak mem")]  # these two: n/a here
        assert not ("MFU" in header and with_numbers), (width, header, hidden)


def test_config_columns_fold_their_headers_then_go_before_any_label(tmp_path):
    exp = four_variants(tmp_path)
    wide = rendered(exp, 400)
    header = next(line for line in wide if line.startswith("variant"))
    assert all(key in header for key in ("position.base", "norm_placement", "norm", "activation"))
    narrow = rendered(exp, 60)
    hidden = notes(narrow).partition("hidden at width 60: ")[2]
    assert "activation" in hidden and "position.base" in hidden  # config keys went ...
    assert [line.split(" ")[0] for line in body(narrow)] == list(LABELS)  # ... the labels stayed whole


def test_an_option_at_its_default_shows_the_default(tmp_path):
    table = compare_table(load_results(four_variants(tmp_path)))
    assert list(table["model.position.base"]) == [10000.0, 500.0, 10000.0, 20000.0]  # rope's default base
