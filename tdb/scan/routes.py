"""Component pages of a finished scan: a JSON route and an HTML page per component.

    >>> app = FastAPI()
    >>> app.include_router(scan_router(Path("out")))
    GET /api/component/mlp_neuron/1/234   -> Component (JSON): statistics, top examples, sample
    GET /component/mlp_neuron/1/234       -> the page: token heatmaps of every example

The page is plain HTML and JavaScript with the component's data embedded (no request back, no
CDN), so it works offline and under any mount prefix. Examples are read from examples.parquet
with a filter on (node_type, layer, index), which touches one row group.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

import pyarrow.parquet as pq
from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse

from tdb.errors import TdbError
from tdb.nodes import LatentSite, NodeType
from tdb.scan.out_folder import EXAMPLES, STATS, read_manifest
from tdb.scan.schemas import Component, ComponentStats, Example

# Layers and indices are small non-negative integers; a number past int32 cannot be in the scan,
# and one past int64 made pyarrow's filter raise OverflowError (a plain-text 500). Checked by
# the route, so the answer is a 422 naming the part (`path.index: ...`).
MAX_NUMBER = 2**31 - 1
Layer = Annotated[int, PathParam(ge=0, le=MAX_NUMBER, description="the layer, from 0")]
Index = Annotated[int, PathParam(ge=0, le=MAX_NUMBER, description="neuron, head or latent")]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class ScanReader:
    """Reads one component's records from a finished scan folder."""

    def __init__(self, out: Path) -> None:
        manifest = read_manifest(out)
        if manifest is None or not manifest.get("complete"):
            raise TdbError(f"{out} holds no finished scan (run `tdb scan --out {out}` first)")
        self.out = out

    def component(
        self, node_type: NodeType, layer: int, index: int, site: LatentSite | None = None
    ) -> Component:
        """A component's records; SAE latents also need the `site` their SAE reads."""
        key = [("node_type", "=", str(node_type)), ("layer", "=", layer), ("index", "=", index)]
        if site is not None:
            key.append(("site", "=", str(site)))
        stats = pq.read_table(self.out / STATS, filters=key).to_pylist()
        where = f"{node_type} {index} in layer {layer}" + ("" if site is None else f" ({site})")
        if not stats:
            raise KeyError(f"the scan has no {where}")
        if len(stats) > 1:
            sites = ", ".join(sorted(str(s["site"]) for s in stats))
            raise KeyError(f"the scan has several {where}: say which with ?site= ({sites})")
        rows = pq.read_table(self.out / EXAMPLES, filters=key).to_pylist()
        examples = [Example(**{k: r[k] for k in Example.model_fields}) for r in rows]
        s = stats[0]
        return Component(
            node_type=node_type,
            layer=layer,
            index=index,
            site=s["site"],
            stats=ComponentStats(
                count=s["count"],
                mean=_finite(s["mean"]),
                variance=_finite(s["variance"]),
                max=_finite(s["max"]),
            ),
            top=sorted((e for e in examples if e.rank is not None), key=lambda e: e.rank or 0),
            random_sample=[e for e in examples if e.rank is None],
        )


def page_html(component: Component) -> str:
    """The component page: the template with the component's JSON embedded."""
    template = files("tdb.scan").joinpath("page.html").read_text(encoding="utf-8")
    data = json.dumps(component.model_dump(mode="json")).replace("</", "<\\/")
    site = "" if component.site is None else f" {component.site}"
    title = f"{component.node_type}{site} L{component.layer} #{component.index}"
    return template.replace("{{TITLE}}", title).replace("{{DATA}}", data)


def scan_router(out: Path) -> APIRouter:
    """Routes for the finished scan in `out` (a TdbError now if there is none)."""
    reader = ScanReader(out)
    router = APIRouter()

    def load(node_type: NodeType, layer: int, index: int, site: LatentSite | None) -> Component:
        try:
            return reader.component(node_type, layer, index, site)
        except KeyError as e:
            raise HTTPException(status_code=404, detail=str(e.args[0])) from None

    @router.get("/api/component/{node_type}/{layer}/{index}", response_model=Component)
    def component_json(
        node_type: NodeType, layer: Layer, index: Index, site: LatentSite | None = None
    ) -> Component:
        return load(node_type, layer, index, site)

    @router.get(
        "/component/{node_type}/{layer}/{index}",
        response_class=HTMLResponse,
        responses={404: {"description": "no such component in the scan"}},
    )
    def component_page(
        node_type: NodeType, layer: Layer, index: Index, site: LatentSite | None = None
    ) -> Any:
        return HTMLResponse(page_html(load(node_type, layer, index, site)))

    return router
