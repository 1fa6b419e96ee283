"""Pictures of a circuit: the graph as SVG, the faithfulness curve as SVG and PNG.

    >>> svg = circuit_svg(circuit, n_layer=loaded.model.config.n_layer)   # a string
    >>> curve_png(circuit, Path("out/curve.png"))

The graph's layout is our own, with no JavaScript: the residual stream runs bottom (the
embeddings) to top (the logits), one band per layer's attention and one per its MLP, so an edge
always goes up. Heads are boxes labelled `2.1` with three inputs on their bottom edge, q at the
left, k in the middle, v at the right; edges into them are also drawn solid (q), dashed (k) and
dotted (v), so the two cues agree. Neurons and SAE latents are smaller boxes labelled by their
ids, several lines of them where a band holds many. Edges are cubic curves from the top of their
source to the input of their target: red when the score is positive (the edge carries the
behaviour; red is positive in the node table too), blue when negative, wider with |score|,
strongest drawn last (on top). Each component is an `<a href="/component/...">` (its page of
dataset examples, `tdb.nodes.component_link`) with a `<title>` tooltip; each edge has a
`<title>` with its scores. The SVG has no `<style>` and no ids: it is inlined in the web page,
where either could clash with the page's own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from tdb.circuit.result import Circuit, Edge
from tdb.nodes import ComponentIndex, LatentSite, NodeType, component_link, parse_target

EMBED, LOGITS = "embed", "logits"
POSITIVE, NEGATIVE = "#c62828", "#1f5fbf"  # as the node table: red carries it, blue opposes
DASHES = {"q": None, "k": "7 4", "v": "1.5 3.5"}  # solid, dashed, dotted; other inputs solid
PORTS = {"q": -0.3, "k": 0.0, "v": 0.3}  # where on a head's bottom edge, in box widths
MIN_WIDTH, MAX_WIDTH = 0.8, 7.0  # an edge's stroke, from score 0 to the largest |score|
FONT = "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace"
CHAR_W = 6.8  # px per character at 11 px monospace, for box widths
HEAD_W, BOX_H, GAP = 58.0, 34.0, 10.0
LABEL_W, MARGIN, CONTENT_W = 86.0, 14.0, 880.0  # band labels on the left; boxes wrap past CONTENT_W
EMPTY_BAND_H, BAR_H = 24.0, 26.0
FILL = {
    NodeType.ATTENTION_HEAD: ("#fff3e0", "#d9822b"),
    NodeType.MLP_NEURON: ("#e8f5e9", "#3d8b40"),
    NodeType.AUTOENCODER_LATENT: ("#f3e8fd", "#7b4fb8"),
}


@dataclass(frozen=True)
class Box:
    """A component's box: `x`, `y` its top-left corner, in SVG pixels (y grows downwards)."""

    id: str
    component: ComponentIndex
    x: float
    y: float
    w: float
    h: float

    @property
    def label(self) -> str:
        """`2.1` for a head (the layer and head the heatmaps show), the id otherwise."""
        if self.component.node_type is NodeType.ATTENTION_HEAD:
            return f"{self.component.layer}.{self.component.index}"
        return self.id

    def output(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y

    def input(self, name: str) -> tuple[float, float]:
        return self.x + self.w * (0.5 + PORTS.get(name, 0.0)), self.y + self.h


def band_of(component: ComponentIndex) -> tuple[int, int]:
    """(layer, 0) for what reads or writes the attention output, (layer, 1) for the MLP's."""
    attention = component.node_type is NodeType.ATTENTION_HEAD or (
        component.site is LatentSite.ATTN_OUT
    )
    return component.layer, 0 if attention else 1


def box_width(component: ComponentIndex, cid: str) -> float:
    if component.node_type is NodeType.ATTENTION_HEAD:
        return HEAD_W
    return max(44.0, CHAR_W * len(cid) + 14)


def node_ids(circuit: Circuit) -> list[str]:
    """The circuit's components, then any other component an edge names (none, from
    `find_circuit`; a hand-made circuit may have them), each once."""
    ids = list(dict.fromkeys(circuit.components))
    for edge in circuit.edges:
        for end in (edge.source, edge.target):
            if end not in (EMBED, LOGITS) and end not in ids:
                ids.append(end)
    return ids


def component_of(cid: str, n_layer: int) -> ComponentIndex:
    target = parse_target(cid)
    if not isinstance(target, ComponentIndex):
        raise ValueError(f"{cid!r} is not a component id (h2.1, n1.234, am1.42)")
    if not 0 <= target.layer < n_layer:
        raise ValueError(f"{cid}: layer {target.layer} is outside 0..{n_layer - 1}")
    return target


def fmt(value: float | None) -> str:
    if value is None:
        return "none"
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"


def component_title(cid: str, circuit: Circuit) -> str:
    """The tooltip: the id, what it is, its rank in the search, its edges' scores."""
    component = parse_target(cid)
    assert isinstance(component, ComponentIndex)
    kind = {
        NodeType.ATTENTION_HEAD: f"attention head {component.index} of layer {component.layer}",
        NodeType.MLP_NEURON: f"MLP neuron {component.index} of layer {component.layer}",
        NodeType.AUTOENCODER_LATENT: f"SAE latent {component.index} on layer "
        f"{component.layer}'s {component.site.value if component.site else ''}",
    }[component.node_type]
    lines = [f"{cid}: {kind}"]
    if cid in circuit.components:
        rank = circuit.components.index(cid) + 1
        lines.append(f"#{rank} of {len(circuit.components)} by {circuit.method} score")
    else:
        lines.append("not in the circuit (named by an edge)")
    into = [e for e in circuit.edges if e.target == cid]
    out = [e for e in circuit.edges if e.source == cid]
    for name, edges in (("in", into), ("out", out)):
        if edges:
            total = sum(e.score for e in edges)
            lines.append(f"edges {name}: {len(edges)}, scores sum {fmt(total)}")
    for e in out:
        if e.target == LOGITS:
            lines.append(f"to logits: score {fmt(e.score)}, exact {fmt(e.exact)}")
    return "\n".join(lines)


def edge_title(edge: Edge) -> str:
    return (
        f"{edge.source} -> {edge.target} ({edge.input}): score {fmt(edge.score)}, "
        f"exact {fmt(edge.exact)}"
    )


def edge_width(score: float, largest: float) -> float:
    """Linear in |score|: the strongest edge is MAX_WIDTH wide, a zero one MIN_WIDTH."""
    if not largest or math.isnan(score):
        return MIN_WIDTH
    return MIN_WIDTH + (MAX_WIDTH - MIN_WIDTH) * min(1.0, abs(score) / largest)


def layout(
    ids: Sequence[str], n_layer: int
) -> tuple[dict[str, Box], list[tuple[str, float, float]], float, float]:
    """Each component's box, the bands (label, top y, height) and the drawing's width and
    height. Bands are stacked top (logits) to bottom (embed); within a band, boxes in order of
    (node type, index), wrapped to lines of at most CONTENT_W px, each line centred."""
    components = {cid: component_of(cid, n_layer) for cid in ids}
    members: dict[tuple[int, int], list[str]] = {}
    for cid, component in components.items():
        members.setdefault(band_of(component), []).append(cid)
    for band in members.values():
        band.sort(key=lambda c: (components[c].node_type, components[c].site or "", components[c]))

    def lines(band: list[str]) -> list[list[str]]:
        out: list[list[str]] = [[]]
        used = 0.0
        for cid in band:
            w = box_width(components[cid], cid)
            if out[-1] and used + w > CONTENT_W:
                out.append([])
                used = 0.0
            out[-1].append(cid)
            used += w + GAP
        return out

    def line_width(line: list[str]) -> float:
        return sum(box_width(components[c], c) for c in line) + GAP * (len(line) - 1)

    bands = [(layer, part) for layer in reversed(range(n_layer)) for part in (1, 0)]
    wrapped = {band: lines(members[band]) for band in bands if band in members}
    content_w = max([600.0] + [line_width(ln) for b in wrapped.values() for ln in b])
    width = LABEL_W + content_w + 2 * MARGIN
    centre = LABEL_W + MARGIN + content_w / 2

    boxes: dict[str, Box] = {}
    rows: list[tuple[str, float, float]] = []
    y = MARGIN
    rows.append((LOGITS, y, BAR_H + 2 * GAP))
    y += BAR_H + 2 * GAP
    for layer, part in bands:
        name = f"L{layer} {'attn' if part == 0 else 'mlp'}"
        if (layer, part) not in wrapped:
            rows.append((name, y, EMPTY_BAND_H))
            y += EMPTY_BAND_H
            continue
        band_lines = wrapped[(layer, part)]
        height = len(band_lines) * (BOX_H + 2.5 * GAP) + 1.5 * GAP
        rows.append((name, y, height))
        # Lines fill the band from its bottom up (its first line the lowest), leaving room
        # above each line for edges to bend into the boxes' inputs.
        line_y = y + height - GAP - BOX_H
        for line in band_lines:
            x = centre - line_width(line) / 2
            for cid in line:
                w = box_width(components[cid], cid)
                boxes[cid] = Box(cid, components[cid], x, line_y, w, BOX_H)
                x += w + GAP
            line_y -= BOX_H + 2.5 * GAP
        y += height
    rows.append((EMBED, y, BAR_H + 2 * GAP))
    y += BAR_H + 2 * GAP + MARGIN
    return boxes, rows, width, y


def attrs(**values: object) -> str:
    """` name="value"` pairs, escaped; None values left out; `class_` is `class`."""
    return "".join(
        f" {k.rstrip('_').replace('_', '-')}={quoteattr(str(v))}"
        for k, v in values.items()
        if v is not None
    )


def circuit_svg(circuit: Circuit, n_layer: int) -> str:
    """The circuit as a standalone SVG document (also valid inline in HTML):
    `Path("circuit.svg").write_text(circuit_svg(circuit, loaded.model.config.n_layer))`.

    Every band of an `n_layer` model is drawn (empty ones thin) so the picture shows where in
    the model the circuit lives. ValueError if a component id is not one, or its layer is not
    below `n_layer`."""
    ids = node_ids(circuit)
    boxes, bands, width, height = layout(ids, n_layer)
    left, right = LABEL_W + MARGIN, width - MARGIN
    logits_y = bands[0][1] + GAP  # the bars' top edges
    embed_y = bands[-1][1] + GAP
    svg_w, svg_h = round(width), round(height + 80)  # 80: the legend
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg"{attrs(width=svg_w, height=svg_h)}'
        f"{attrs(viewBox=f'0 0 {svg_w} {svg_h}', font_family=FONT)}"
        f' font-size="11" role="img">',
        f"<title>circuit of {len(circuit.components)} components, faithfulness "
        f"{fmt(circuit.faithfulness)} (target {fmt(circuit.target_faithfulness)})</title>",
        '<rect width="100%" height="100%" fill="#ffffff"/>',
    ]
    for i, (name, top, h) in enumerate(bands):
        shade = "#f4f6f9" if i % 2 else "#ffffff"
        out.append(f"<rect{attrs(x=0, y=top, width=width, height=h, fill=shade)}/>")
        used = name in (EMBED, LOGITS) or any(top <= b.y < top + h for b in boxes.values())
        out.append(
            f"<text{attrs(x=MARGIN, y=top + h / 2 + 4, fill='#374151' if used else '#9aa1ad')}>"
            f"{escape(name)}</text>"
        )
    for y, name in ((logits_y, LOGITS), (embed_y, EMBED)):
        out.append(
            f"<rect{attrs(x=left, y=y, width=right - left, height=BAR_H, rx=4)}"
            ' fill="#eef1f6" stroke="#8b93a3"/>'
        )
        text = "logits (the metric)" if name == LOGITS else "embeddings (token + position)"
        out.append(
            f'<text{attrs(x=(left + right) / 2, y=y + BAR_H / 2 + 4)} text-anchor="middle">'
            f"{text}</text>"
        )

    largest = max((abs(e.score) for e in circuit.edges if not math.isnan(e.score)), default=0.0)
    for edge in sorted(circuit.edges, key=lambda e: abs(e.score) if not math.isnan(e.score) else 0):
        target = boxes.get(edge.target)
        source = boxes.get(edge.source)
        x2, y2 = target.input(edge.input) if target else (0.0, logits_y + BAR_H)
        x1, y1 = source.output() if source else (x2, embed_y)
        if target is None:  # into the logits bar, above its source
            x2 = x1
        bend = max(24.0, abs(y1 - y2) / 2)
        d = (
            f"M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 - bend:.1f} "
            f"{x2:.1f},{y2 + bend:.1f} {x2:.1f},{y2:.1f}"
        )
        colour = NEGATIVE if edge.score < 0 else POSITIVE
        out.append(
            f"<path{attrs(class_='edge', d=d, fill='none', stroke=colour)}"
            f"{attrs(stroke_width=f'{edge_width(edge.score, largest):.2f}')}"
            f"{attrs(stroke_dasharray=DASHES.get(edge.input), stroke_opacity=0.7)}"
            f"{attrs(data_from=edge.source, data_to=edge.target, data_input=edge.input)}"
            f"{attrs(data_score=repr(edge.score))}>"
            f"<title>{escape(edge_title(edge))}</title></path>"
        )

    for cid in ids:
        box = boxes[cid]
        fill, stroke = FILL[box.component.node_type]
        href = component_link(box.component.at(0))
        out.append(f"<a{attrs(href=href, class_='node', data_id=cid)}>")
        out.append(f"<title>{escape(component_title(cid, circuit))}</title>")
        dashed = None if cid in circuit.components else "3 2"
        out.append(
            f"<rect{attrs(x=box.x, y=box.y, width=box.w, height=box.h, rx=5, fill=fill)}"
            f"{attrs(stroke=stroke, stroke_width=1.4, stroke_dasharray=dashed)}/>"
        )
        head = box.component.node_type is NodeType.ATTENTION_HEAD
        out.append(
            f"<text{attrs(x=box.x + box.w / 2, y=box.y + (14 if head else box.h / 2 + 4))}"
            f' text-anchor="middle" fill="#111827">{escape(box.label)}</text>'
        )
        if head:
            for port, at in PORTS.items():
                px = box.x + box.w * (0.5 + at)
                out.append(
                    f'<text{attrs(x=px, y=box.y + box.h - 5)} text-anchor="middle"'
                    f' font-size="9" fill="#6b7280">{port}</text>'
                )
        out.append("</a>")
    if not ids:
        out.append(
            f'<text{attrs(x=(left + right) / 2, y=height / 2)} text-anchor="middle"'
            ' fill="#6b7280">no components</text>'
        )
    out.extend(legend(left, height))
    out.append("</svg>")
    return "\n".join(out)


def legend(left: float, top: float) -> Iterator[str]:
    """What the line styles and colours mean, under the graph."""
    yield f"<g{attrs(class_='legend')}>"
    y = top + 14
    x = left
    for name, dash in DASHES.items():
        yield (
            f"<line{attrs(x1=x, y1=y, x2=x + 34, y2=y, stroke='#374151', stroke_width=2.5)}"
            f"{attrs(stroke_dasharray=dash)}/>"
        )
        yield f"<text{attrs(x=x + 40, y=y + 4)}>into {name}</text>"
        x += 112
    yield (
        f"<line{attrs(x1=x, y1=y, x2=x + 34, y2=y, stroke='#374151', stroke_width=2.5)}/>"
        f"<text{attrs(x=x + 40, y=y + 4)}>into mlp / logits</text>"
    )
    y += 22
    x = left
    for colour, text in ((POSITIVE, "positive score"), (NEGATIVE, "negative score")):
        yield f"<line{attrs(x1=x, y1=y, x2=x + 34, y2=y, stroke=colour, stroke_width=4)}/>"
        yield f"<text{attrs(x=x + 40, y=y + 4)}>{text}</text>"
        x += 150
    yield f"<text{attrs(x=x, y=y + 4)}>width: |score|</text>"
    yield (
        f"<text{attrs(x=left, y=y + 26, fill='#6b7280')}>a head's inputs: q k v, left to "
        "right; dashed box: not in the circuit; click a box: its component page</text>"
    )
    yield "</g>"


# ---- the faithfulness curve ----------------------------------------------------------------

CURVE_W, CURVE_H = 480, 320
PLOT = (58, 18, 20, 62)  # left, top, right, bottom margins of the plot area
CIRCUIT_COLOUR, RANDOM_COLOUR, TARGET_COLOUR = "#1f5fbf", "#8b93a3", "#d9822b"


def curve_range(circuit: Circuit) -> tuple[float, float, float, float]:
    """(n_min, n_max, y_min, y_max): 0..1 always in view, and the target, and every point."""
    ns = [float(p.n) for p in circuit.curve] or [0.0, 1.0]
    ys = [v for p in circuit.curve for v in (p.faithfulness, p.random) if math.isfinite(v)]
    ys += [0.0, 1.0, circuit.target_faithfulness]
    n_min, n_max = min(ns), max(ns)
    return n_min, (n_max if n_max > n_min else n_min + 1), min(ys), max(ys)


def ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round values between lo and hi, about `count` of them."""
    step = (hi - lo) / count
    magnitude = 10.0 ** math.floor(math.log10(step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def segments(points: Sequence[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """The runs of finite points: a NaN (an undefined faithfulness) breaks the line."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if math.isfinite(y):
            runs[-1].append((x, y))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def curve_svg(circuit: Circuit) -> str:
    """The faithfulness of the top-n circuit against n, the mean of random circuits of the same
    size, the target as a horizontal line and the circuit's size as a vertical one:
    `Path("curve.svg").write_text(curve_svg(circuit))`. A standalone SVG document."""
    left, top, right, bottom = PLOT
    x0, x1, y0, y1 = left, CURVE_W - right, top, CURVE_H - bottom
    n_min, n_max, lo, hi = curve_range(circuit)
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad

    def px(n: float) -> float:
        return x0 + (n - n_min) / (n_max - n_min) * (x1 - x0)

    def py(v: float) -> float:
        return y1 - (v - lo) / (hi - lo) * (y1 - y0)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg"{attrs(width=CURVE_W, height=CURVE_H)}'
        f'{attrs(viewBox=f"0 0 {CURVE_W} {CURVE_H}", font_family=FONT)} font-size="11"'
        ' role="img">',
        "<title>faithfulness of the top-n circuit and of random circuits of size n</title>",
        '<rect width="100%" height="100%" fill="#ffffff"/>',
    ]
    for v in ticks(lo, hi):
        out.append(f"<line{attrs(x1=x0, x2=x1, y1=py(v), y2=py(v), stroke='#eceff3')}/>")
        out.append(f'<text{attrs(x=x0 - 6, y=py(v) + 4)} text-anchor="end">{v:.4g}</text>')
    for n in ticks(n_min, n_max):
        if n == int(n):
            out.append(f'<text{attrs(x=px(n), y=y1 + 16)} text-anchor="middle">{int(n)}</text>')
    out.append(
        f'<rect{attrs(x=x0, y=y0, width=x1 - x0, height=y1 - y0)} fill="none" stroke="#8b93a3"/>'
    )
    out.append(
        f'<text{attrs(x=(x0 + x1) / 2, y=y1 + 34)} text-anchor="middle">n: components in '
        "the circuit (top n by score)</text>"
    )
    out.append(
        f'<text{attrs(x=14, y=(y0 + y1) / 2)} text-anchor="middle"'
        f"{attrs(transform=f'rotate(-90 14 {(y0 + y1) / 2})')}>faithfulness</text>"
    )
    target = circuit.target_faithfulness
    out.append(
        f"<line{attrs(x1=x0, x2=x1, y1=py(target), y2=py(target), stroke=TARGET_COLOUR)}"
        ' stroke-width="1.5" stroke-dasharray="6 4"><title>target '
        f"{fmt(target)}</title></line>"
    )
    size = float(len(circuit.components))
    if circuit.curve and n_min <= size <= n_max:
        out.append(
            f"<line{attrs(x1=px(size), x2=px(size), y1=y0, y2=y1, stroke='#374151')}"
            ' stroke-width="1" stroke-dasharray="2 3"><title>the circuit: '
            f"{len(circuit.components)} components, measured faithfulness "
            f"{fmt(circuit.faithfulness)}</title></line>"
        )
    for colour, name, dash, values in (
        (RANDOM_COLOUR, "random", "5 3", [(float(p.n), p.random) for p in circuit.curve]),
        (CIRCUIT_COLOUR, "top-n", None, [(float(p.n), p.faithfulness) for p in circuit.curve]),
    ):
        for run in segments(values):
            points = " ".join(f"{px(n):.1f},{py(v):.1f}" for n, v in run)
            out.append(
                f"<polyline{attrs(class_=f'curve-{name}', points=points, fill='none')}"
                f"{attrs(stroke=colour, stroke_width=2, stroke_dasharray=dash)}/>"
            )
            for n, v in run:
                out.append(
                    f"<circle{attrs(cx=f'{px(n):.1f}', cy=f'{py(v):.1f}', r=2.5, fill=colour)}>"
                    f"<title>{name}, n={n:g}: {fmt(v)}</title></circle>"
                )
    if not circuit.curve:
        out.append(
            f'<text{attrs(x=(x0 + x1) / 2, y=(y0 + y1) / 2)} text-anchor="middle"'
            ' fill="#6b7280">no curve</text>'
        )
    legend_y = CURVE_H - 12
    x = x0
    for colour, text, dash in (
        (CIRCUIT_COLOUR, "top-n circuit", None),
        (RANDOM_COLOUR, "random (mean)", "5 3"),
        (TARGET_COLOUR, "target", "6 4"),
    ):
        out.append(
            f"<line{attrs(x1=x, x2=x + 24, y1=legend_y - 4, y2=legend_y - 4, stroke=colour)}"
            f"{attrs(stroke_width=2, stroke_dasharray=dash)}/>"
        )
        out.append(f"<text{attrs(x=x + 28, y=legend_y)}>{text}</text>")
        x += 136
    out.append("</svg>")
    return "\n".join(out)


def curve_png(circuit: Circuit, path: Path) -> None:
    """The same curve as `curve_svg`, drawn by matplotlib (Agg, no display) into a PNG file:
    `curve_png(circuit, Path("out/curve.png"))`. The file's folder must exist."""
    # The object API (Figure + the Agg canvas) leaves pyplot's global figure state alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    ns = [p.n for p in circuit.curve]
    axes.plot(
        ns,
        [p.faithfulness for p in circuit.curve],
        "o-",
        color=CIRCUIT_COLOUR,
        markersize=3,
        label="top-n circuit",
    )
    axes.plot(
        ns,
        [p.random for p in circuit.curve],
        "o--",
        color=RANDOM_COLOUR,
        markersize=3,
        label="random (mean)",
    )
    axes.axhline(
        circuit.target_faithfulness,
        color=TARGET_COLOUR,
        linestyle=":",
        label=f"target {circuit.target_faithfulness:g}",
    )
    if circuit.components:
        axes.axvline(len(circuit.components), color="#374151", linewidth=0.8, linestyle=":")
    axes.set_xlabel("n: components in the circuit (top n by score)")
    axes.set_ylabel("faithfulness")
    axes.set_title(
        f"{len(circuit.components)} components, faithfulness {fmt(circuit.faithfulness)}"
    )
    axes.grid(True, color="#eceff3")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, format="png")


def write_figures(circuit: Circuit, n_layer: int, out: Path) -> None:
    """`tdb circuit --out DIR`: circuit.json, circuit.svg (the graph), curve.svg and curve.png."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "circuit.json").write_text(json.dumps(circuit.to_json(), indent=1) + "\n")
    (out / "circuit.svg").write_text(circuit_svg(circuit, n_layer))
    (out / "curve.svg").write_text(curve_svg(circuit))
    curve_png(circuit, out / "curve.png")
