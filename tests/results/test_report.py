"""gptlab show --png and gptlab report --html, on run directories written by hand.

The image is checked twice: the matplotlib Figure before saving (lines, labels, the numbers of
metrics.jsonl) and the PNG after (its pixels hold the lines' colours). The page is rendered in
headless Chromium, so what is checked is what a reader sees after plotly's JavaScript ran: the
table cells, the traces, the legend, and the x-axis switch.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gptlab.results.compare import compare_results
from gptlab.results.plots import PALETTE, experiment_panels, figure, run_by_run_panels, run_panels
from gptlab.results.frame import load_results
from gptlab.rundir import METRICS

from helpers import imported_modules, make_experiment, make_run, run_cli, run_subprocess

ODD = "odd$x$<b>&y"  # markup for matplotlib, HTML and plotly alike: must be drawn literally
ARMS = {"pre_ln": [1.0, 1.1], "post_ln": [1.3, 1.2], ODD: [1.5]}
EXTRA = 'pip install "gptlab[report]" (in a checkout: pip install -e ".[report]")'


def curve(val: float, seed: int) -> list[dict]:
    """Train loss at steps 5..20 with tokens; val loss val + 0.5 at step 10 and val at 20."""
    rows = [{"step": s, "tokens": s * 512, "train_loss": val + 2.0 / s + 0.01 * seed, "lr": 1e-3} for s in (5, 10, 15, 20)]
    rows[1]["val_loss"], rows[3]["val_loss"] = val + 0.5, val
    return rows


def build(root: Path, name: str = "exp") -> Path:
    exp = make_experiment(root, name, {v: [] for v in ARMS})
    for variant, vals in ARMS.items():
        for seed, val in enumerate(vals):
            make_run(exp, variant, seed, val, metrics=curve(val, seed))
    return exp


def logged(run: Path, key: str) -> tuple[list, list]:
    rows = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    return [r["step"] for r in rows if key in r], [r[key] for r in rows if key in r]


def stderr_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("results"))


# -- the image ---------------------------------------------------------------------------------
def test_run_figure_holds_the_logged_losses(exp):
    run = exp / "pre_ln__hpre_ln__s1"
    fig = figure("a run", run_panels(run))
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["train", "val"]
    for line, key in zip(ax.get_lines(), ("train_loss", "val_loss")):
        steps, values = logged(run, key)
        assert list(line.get_xdata()) == steps and list(line.get_ydata()) == pytest.approx(values, abs=0)
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("step", "loss", "loss curves")
    assert fig._suptitle.get_text() == "a run"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "val"]


def test_experiment_figure_overlays_each_variants_mean_curve(exp):
    fig = figure("exp", experiment_panels(load_results(exp)))
    val_ax, train_ax = fig.axes
    assert val_ax.get_title() == "validation loss, mean of seeds" and train_ax.get_title() == "training loss, mean of seeds"
    labels = ["pre_ln (n=2)", "post_ln (n=2)", f"{ODD} (n=1)"]
    for ax, key in ((val_ax, "val_loss"), (train_ax, "train_loss")):
        assert [line.get_label() for line in ax.get_lines()] == labels
        assert [t.get_text() for t in ax.get_legend().get_texts()] == labels  # literally, '$' and all
        for line, (variant, vals) in zip(ax.get_lines(), ARMS.items()):
            per_seed = [logged(exp / f"{variant}__h{variant}__s{seed}", key) for seed in range(len(vals))]
            steps = per_seed[0][0]
            means = [sum(ys[i] for _, ys in per_seed) / len(per_seed) for i in range(len(steps))]
            assert list(line.get_xdata()) == steps and list(line.get_ydata()) == pytest.approx(means, rel=1e-12)
    # a variant keeps its colour in both panels; variants differ
    assert [line.get_color() for line in val_ax.get_lines()] == [line.get_color() for line in train_ax.get_lines()]
    assert [line.get_color() for line in val_ax.get_lines()] == list(PALETTE[:3])


def test_experiment_image_has_one_line_per_variant_and_seed(exp):
    panels, variant_of = run_by_run_panels(load_results(exp))
    fig = figure("exp", panels, colour_of=variant_of)
    val_ax, train_ax = fig.axes
    assert (val_ax.get_title(), train_ax.get_title()) == ("validation loss", "training loss")
    labels = [f"{variant}/s{seed}" for variant, vals in ARMS.items() for seed in range(len(vals))]
    for ax, key in ((val_ax, "val_loss"), (train_ax, "train_loss")):
        assert [line.get_label() for line in ax.get_lines()] == labels
        assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
        for line, label in zip(ax.get_lines(), labels):
            variant, seed = label.rsplit("/s", 1)
            steps, values = logged(exp / f"{variant}__h{variant}__s{seed}", key)
            assert list(line.get_xdata()) == steps and list(line.get_ydata()) == values
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "loss")
    # a variant's seeds share its colour and differ in line style; variants differ in colour
    lines = dict(zip(labels, val_ax.get_lines()))
    assert [lines[f"{v}/s0"].get_color() for v in ARMS] == list(PALETTE[:3])
    for variant in ("pre_ln", "post_ln"):
        a, b = lines[f"{variant}/s0"], lines[f"{variant}/s1"]
        assert a.get_color() == b.get_color() and a.get_linestyle() != b.get_linestyle()


def png_colours(path: Path, min_pixels: int = 40) -> set[str]:
    """Palette colours that cover at least ``min_pixels`` pixels of the image (±2 per channel).
    The palette's grey is left out: anti-aliased black text makes greys of every shade."""
    import numpy as np
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 400
    rgb = np.round(img[..., :3] * 255).astype(int)
    found = set()
    for colour in PALETTE:
        if colour[1:3] == colour[3:5] == colour[5:]:  # grey
            continue
        want = np.round(np.array(to_rgb(colour)) * 255).astype(int)
        if (np.abs(rgb - want).max(axis=-1) <= 2).sum() >= min_pixels:
            found.add(colour)
    return found


def test_show_png_of_an_experiment_imports_matplotlib_not_torch(exp, tmp_path):
    out = tmp_path / "curves.png"
    proc = run_subprocess("show", exp, "--png", out, flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"wrote {out} (10 curves)"  # 5 runs x (val, train)
    tops = {m.split(".")[0] for m in imported_modules(proc.stderr)}
    assert "matplotlib" in tops and "torch" not in tops
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png_colours(out) == set(PALETTE[:3])  # one colour per variant, nothing else from the palette
    assert not list(tmp_path.glob(".*tmp*"))
    plain = run_subprocess("show", exp, flags=("-X", "importtime"), env={"COLUMNS": "80"})
    assert plain.returncode == 0 and "validation loss, mean of seeds" in plain.stdout
    assert "matplotlib" not in {m.split(".")[0] for m in imported_modules(plain.stderr)}  # only --png loads it


def test_show_png_of_a_run(exp, tmp_path, capsys):
    out = tmp_path / "run.png"
    out.write_bytes(b"old")  # replaced whole
    rc, stdout, err = run_cli(capsys, "show", exp / "post_ln__hpost_ln__s0", "--png", out)
    assert rc == 0, err
    assert stdout.strip() == f"wrote {out} (2 curves)"
    assert png_colours(out) == set(PALETTE[:2])  # train and val


def test_show_png_errors_are_one_line(exp, tmp_path, capsys, monkeypatch):
    for target, words in ((tmp_path, "is a directory"), (tmp_path / "no" / "x.png", "does not exist")):
        rc, _, err = run_cli(capsys, "show", exp, "--png", target)
        assert rc == 2 and len(stderr_lines(err)) == 1 and words in err, err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    rc, _, err = run_cli(capsys, "show", exp, "--png", tmp_path / "x.png")
    assert rc == 2 and stderr_lines(err) == [
        "gptlab: error: --png needs the matplotlib package, which cannot be imported (ModuleNotFoundError: import of "
        f"matplotlib halted; None in sys.modules); install it with {EXTRA}"]
    assert not (tmp_path / "x.png").exists()
    rc, out, _ = run_cli(capsys, "show", exp)  # the terminal plot needs no extra
    assert rc == 0 and "validation loss, mean of seeds" in out


# -- the page ----------------------------------------------------------------------------------
class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, attrs, parent, [], ""

    @property
    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()

    def find(self, tag: str = "", cls: str = "") -> list["Node"]:
        out = []
        for child in self.children:
            if (not tag or child.tag == tag) and (not cls or cls in child.classes):
                out.append(child)
            out += child.find(tag, cls)
        return out

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class Tree(HTMLParser):
    """A DOM from Chromium's serialisation (every non-void element, SVG included, is closed)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("root", {}, None)
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.node)
        self.node.children.append(node)
        if tag not in self.VOID:
            self.node = node

    def handle_startendtag(self, tag, attrs):
        self.node.children.append(Node(tag, dict(attrs), self.node))

    def handle_endtag(self, tag):
        node = self.node
        while node.parent is not None and node.tag != tag:
            node = node.parent
        if node.parent is not None:
            self.node = node.parent

    def handle_data(self, data):
        self.node.text += data


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Chromium is not installed, and the HTML report is checked in a real browser: "
                "apt-get install -y chromium", pytrace=False)


def render(page: Path, profile: Path) -> Tree:
    """The DOM after the page's scripts ran, with every host name unresolvable (no network)."""
    proc = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
                           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "</html>" in proc.stdout, proc.stderr[-3000:]
    return Tree(proc.stdout)


@pytest.fixture(scope="module")
def page(exp, tmp_path_factory) -> Path:
    """The report of ``exp``, written by a fresh interpreter (which must not import torch)."""
    out = tmp_path_factory.mktemp("page") / "report.html"
    proc = run_subprocess("report", exp, "--html", out, flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"wrote {out} (1 table(s), 5 runs)"
    assert not [m for m in imported_modules(proc.stderr) if m.split(".")[0] == "torch"]
    return out


@pytest.fixture(scope="module")
def dom(page, tmp_path_factory) -> Tree:
    return render(page, tmp_path_factory.mktemp("profile"))


def test_page_is_self_contained(page):
    tree = Tree(page.read_text(encoding="utf-8"))
    refs = [(n.tag, k, v) for n in tree.root.find() for k, v in n.attrs.items()
            if k in ("src", "href", "srcset", "data", "action") and v]
    assert all(not v.startswith(("http:", "https:", "//")) for _, _, v in refs), refs
    assert not tree.root.find("link") and not tree.root.find("iframe")
    scripts = tree.root.find("script")
    assert scripts and all("src" not in s.attrs for s in scripts)
    assert any("plotly.js v" in s.text for s in scripts)  # the library is inline
    assert "cdn.plot.ly/plotly" not in page.read_text(encoding="utf-8")


def table_of(tree: Tree) -> tuple[list[str], list[list[str]]]:
    (table,) = tree.root.find("table", "cmp")
    head = [th.all_text() for th in table.find("th")]
    rows = [[td.all_text() for td in tr.find("td")] for tr in table.find("tbody")[0].find("tr")]
    return head, rows


def test_page_table_is_the_compare_table(exp, dom, capsys):
    rc, md, err = run_cli(capsys, "compare", exp, "--format", "md")
    assert rc == 0, err
    lines = [line for line in md.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    head, rows = table_of(dom)
    assert head == split[0] and rows == split[2:]
    (table,) = compare_results(exp)
    assert [r[0] for r in rows] == ["pre_ln", "post_ln", ODD] == list(table["variant"])
    for r, mean, std in zip(rows, table["val_loss_mean"], table["val_loss_std"]):
        assert r[head.index("val_loss")].startswith(f"{mean:.4f}")
    assert rows[1][head.index("Δ vs pre_ln")].startswith(f"{table['delta'].iloc[1]:+.4f}")
    notes = [li.all_text() for li in dom.root.find("ul", "notes")[0].find("li")]
    assert any(n.startswith("val_loss: mean ± std") for n in notes)


def test_page_curves_after_javascript(dom):
    (plot,) = dom.root.find("div", "plot-container")
    panels = {g.attrs.get("class"): g for g in plot.find("g", "subplot")}
    assert set(panels) == {"subplot xy", "subplot x2y2"}
    names = ["pre_ln s0", "pre_ln s1", "post_ln s0", "post_ln s1", f"{ODD} s0"]
    # val: steps 10 and 20, with markers; train: steps 5, 10, 15, 20, a line alone
    for cls, vertices, markers in (("subplot xy", 2, 2), ("subplot x2y2", 4, 0)):
        traces = panels[cls].find("g", "trace")
        assert len(traces) == len(names)
        for trace in traces:
            (line,) = trace.find("path", "js-line")
            assert line.attrs["d"].count("L") + 1 == vertices and len(trace.find("path", "point")) == markers
    assert [t.all_text() for t in plot.find("text", "legendtext")] == names  # one entry per run, drawn literally
    titles = [t.all_text() for t in plot.find("text", "xtitle")] + [t.all_text() for t in plot.find("text", "x2title")]
    assert titles == ["step", "step"]
    assert not [b for b in plot.find("a", "modebar-btn") if "Share" in (b.attrs.get("data-title") or "")]


def test_page_switches_x_to_tokens(page, tmp_path):
    clicked = tmp_path / "clicked.html"
    script = ("<script>window.addEventListener('load', function () {"
              "var r = document.querySelector('input[value=\"tokens\"]'); r.checked = true;"
              "r.dispatchEvent(new Event('change'));});</script></body>")
    clicked.write_text(page.read_text(encoding="utf-8").replace("</body>", script), encoding="utf-8")
    plot = render(clicked, tmp_path / "profile").root.find("div", "plot-container")[0]
    titles = [t.all_text() for t in plot.find("text", "xtitle")] + [t.all_text() for t in plot.find("text", "x2title")]
    assert titles == ["tokens", "tokens"]
    ticks = [t.all_text() for t in plot.find("g", "xtick")]
    assert ticks and max(float(t.replace("k", "e3").replace(",", "")) for t in ticks) >= 5000  # tokens, not steps


def test_report_of_several_experiments_and_merged(tmp_path, capsys):
    a, b = build(tmp_path / "r", "alpha"), build(tmp_path / "r", "beta")
    out = tmp_path / "two.html"
    rc, stdout, err = run_cli(capsys, "report", a, b, "--html", out)
    assert rc == 0 and "2 table(s), 10 runs" in stdout, err
    tree = Tree(out.read_text(encoding="utf-8"))
    assert [h.all_text() for h in tree.root.find("h2")] == ["alpha", "beta"]
    assert len(tree.root.find("table", "cmp")) == 2 and out.read_text().count("gptlabCurves(\"curves-") == 2
    rc, stdout, err = run_cli(capsys, "report", a, b, "--merge", "--html", out)
    assert rc == 0 and "1 table(s), 10 runs" in stdout, err
    tree = Tree(out.read_text(encoding="utf-8"))
    assert [h.all_text() for h in tree.root.find("h2")] == ["merged: alpha, beta"]
    _, rows = table_of(tree)
    assert [r[0] for r in rows] == ["alpha", "alpha", "alpha", "beta", "beta", "beta"]


def test_report_bad_input_is_one_line(exp, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = tmp_path / "notes.txt"
    text.write_text("x")
    out = tmp_path / "r.html"
    cases = [((empty, "--html", out), "no runs found"), ((tmp_path / "nope", "--html", out), "does not exist"),
             ((text, "--html", out), "not a directory"), ((exp, "--html", tmp_path), "is a directory"),
             ((exp, "--html", tmp_path / "no" / "r.html"), "does not exist")]
    for argv, words in cases:
        rc, _, err = run_cli(capsys, "report", *argv)
        assert rc == 2 and len(stderr_lines(err)) == 1 and words in err, (argv, err)
    rc, _, err = run_cli(capsys, "report", exp)
    assert rc == 2 and "--html" in err  # the file is required
    assert not out.exists()

    out.write_text("old page")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    rc, _, err = run_cli(capsys, "report", exp, "--html", out)
    assert rc == 2 and stderr_lines(err) == [f"gptlab: error: cannot write {out}: Permission denied"]
    assert out.read_text() == "old page" and not list(tmp_path.glob(".*tmp*"))  # old file kept, no leftovers
    monkeypatch.undo()

    monkeypatch.setitem(sys.modules, "plotly", None)
    monkeypatch.setitem(sys.modules, "plotly.offline", None)
    rc, _, err = run_cli(capsys, "report", exp, "--html", out)
    assert rc == 2 and stderr_lines(err) == [
        "gptlab: error: gptlab report needs the plotly package, which cannot be imported (ModuleNotFoundError: import "
        f"of plotly.offline halted; None in sys.modules); install it with {EXTRA}"]
