"""Component pages of a finished scan: a JSON route and an HTML page per component, and the
scan's explanations.

    >>> mount_scan(app, Path("out"))   # what `tdb serve --scan out` does
    GET /api/component/mlp_neuron/1/234   -> Component (JSON): id, statistics, top examples,
                                             sample, explanation, logit lens
    GET /component/mlp_neuron/1/234       -> the page: token heatmaps of every example
    GET /api/explanations?node_type=&layer=       -> every explanation (filtered)
    GET /api/explanations/mlp_neuron/1/234        -> one component's explanation
    POST /api/component_activations {component, prompt} -> its value at each prompt token

`mount_scan` also hands the explanations to `POST /api/nodes`, whose rows then carry
`explanation` and `explanation_score`. Explanations are read again when explanations.parquet
changes, so `tdb explain` may run while the server is up.

The page is plain HTML and JavaScript with the component's data embedded (no request back, no
CDN), so it works offline and under any mount prefix. Examples are read from examples.parquet
with a filter on (node_type, layer, index), which touches one row group.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import pyarrow.parquet as pq
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse

from tdb.errors import TdbError
from tdb.nodes import ComponentIndex, LatentSite, NodeIndex, NodeType, parse_target
from tdb.scan.explanations import Explanation, ExplanationsFile, check_model
from tdb.scan.out_folder import EXAMPLES, STATS, read_manifest
from tdb.scan.schemas import (
    Component,
    ComponentActivationsRequest,
    ComponentActivationsResponse,
    ComponentStats,
    Example,
    ExplanationOut,
    ExplanationsResponse,
    LogitLens,
)

if TYPE_CHECKING:
    from tdb.checkpoint import LoadedModel
    from tdb.sae import AttachedSae

# Layers and indices are small non-negative integers; a number past int32 cannot be in the scan,
# and one past int64 made pyarrow's filter raise OverflowError (a plain-text 500). Checked by
# the route, so the answer is a 422 naming the part (`path.index: ...`).
MAX_NUMBER = 2**31 - 1
Layer = Annotated[int, PathParam(ge=0, le=MAX_NUMBER, description="the layer, from 0")]
Index = Annotated[int, PathParam(ge=0, le=MAX_NUMBER, description="neuron, head or latent")]


KINDS = {
    NodeType.MLP_NEURON: "MLP neuron",
    NodeType.ATTENTION_HEAD: "attention head",
    NodeType.AUTOENCODER_LATENT: "SAE latent",
    NodeType.EMBEDDING: "embedding",
}


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
        examples = [Example(**{k: r[k] for k in Example.model_fields if k in r}) for r in rows]
        s = stats[0]
        site_now = None if s["site"] is None else LatentSite(s["site"])
        return Component(
            id=ComponentIndex(node_type, layer, index, site_now).id,
            kind=KINDS[node_type] + ("" if site_now is None else f" ({site_now})"),
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


def explanation_out(e: Explanation) -> ExplanationOut:
    return ExplanationOut(**e.to_json())


def logit_lens(
    loaded: LoadedModel | None, component: Component, explanation: Explanation | None
) -> LogitLens | None:
    """A neuron's or latent's logit lens: from its explanation's evidence when it has one
    (tdb.explain computed it), else, for a neuron, from the model's weights."""
    if component.node_type is NodeType.ATTENTION_HEAD:
        return None
    evidence = {} if explanation is None else explanation.evidence
    if "promotes" in evidence and "suppresses" in evidence:
        return LogitLens(
            promotes=evidence["promotes"],
            suppresses=evidence["suppresses"],
            exciting_tokens=evidence.get("exciting_tokens"),
        )
    if loaded is None or component.node_type is not NodeType.MLP_NEURON:
        return None
    from tdb.explain.token_views import exciting_tokens, neuron_writes
    from tdb.explain.token_views import logit_lens as lens

    model, i = loaded.model, component.index
    promotes, suppresses = lens(
        model, neuron_writes(model, component.layer)[i : i + 1], loaded.tokenizer
    )
    exciting = exciting_tokens(model, component.layer, loaded.tokenizer)
    return LogitLens(
        promotes=promotes[0],
        suppresses=suppresses[0],
        exciting_tokens=None if exciting is None else exciting[i],
    )


def _loaded(request: Request) -> LoadedModel | None:
    """The server's model when the routes run inside `tdb serve` (None under a bare app)."""
    state = getattr(request.app.state, "tdb", None)
    return getattr(state, "loaded", None)


def scan_router(out: Path) -> APIRouter:
    """Routes for the finished scan in `out` (a TdbError now if there is none)."""
    reader = ScanReader(out)
    explanations = ExplanationsFile(out)
    saes: list[AttachedSae] | None = None  # the scan's SAEs, loaded on first use
    router = APIRouter()

    def load(
        node_type: NodeType, layer: int, index: int, site: LatentSite | None, request: Request
    ) -> Component:
        try:
            component = reader.component(node_type, layer, index, site)
        except KeyError as error:
            raise HTTPException(status_code=404, detail=str(error.args[0])) from None
        found = explanations.current_or_none()
        site_now = None if component.site is None else LatentSite(component.site)
        e = None if found is None else found.get(node_type, layer, index, site_now)
        return component.model_copy(
            update={
                "explanation": None if e is None else explanation_out(e),
                "logit_lens": logit_lens(_loaded(request), component, e),
            }
        )

    def current() -> Any:
        try:
            return explanations.current()
        except TdbError as e:
            raise HTTPException(status_code=404, detail=str(e)) from None

    @router.get("/api/component/{node_type}/{layer}/{index}", response_model=Component)
    def component_json(
        node_type: NodeType,
        layer: Layer,
        index: Index,
        request: Request,
        site: LatentSite | None = None,
    ) -> Component:
        return load(node_type, layer, index, site, request)

    @router.get(
        "/component/{node_type}/{layer}/{index}",
        response_class=HTMLResponse,
        responses={404: {"description": "no such component in the scan"}},
    )
    def component_page(
        node_type: NodeType,
        layer: Layer,
        index: Index,
        request: Request,
        site: LatentSite | None = None,
    ) -> Any:
        return HTMLResponse(page_html(load(node_type, layer, index, site, request)))

    @router.get(
        "/api/explanations",
        response_model=ExplanationsResponse,
        responses={404: {"description": "the scan has no explanations: run `tdb explain`"}},
    )
    def explanations_all(
        node_type: NodeType | None = None,
        layer: Annotated[int | None, Query(ge=0, le=MAX_NUMBER)] = None,
    ) -> ExplanationsResponse:
        """Every explanation of the scan, or those of one node type and / or layer."""
        found = current().select(node_type, layer)
        return ExplanationsResponse(explanations=[explanation_out(e) for e in found])

    @router.get(
        "/api/explanations/{node_type}/{layer}/{index}",
        response_model=ExplanationOut,
        responses={404: {"description": "no explanation of that component"}},
    )
    def explanation_one(
        node_type: NodeType, layer: Layer, index: Index, site: LatentSite | None = None
    ) -> ExplanationOut:
        """One component's explanation, score and evidence."""
        found = current()
        e = found.get(node_type, layer, index, site)
        if e is None and site is None:  # a latent named without its site: the only one
            some = [x for x in found.select(node_type, layer) if x.index == index]
            e = some[0] if len(some) == 1 else None
        if e is None:
            where = f"{node_type} {index} in layer {layer}"
            raise HTTPException(
                status_code=404,
                detail=f"no explanation of {where} (run `tdb explain --scan {out}`; "
                "embeddings have none)",
            )
        return explanation_out(e)

    @router.post(
        "/api/component_activations",
        response_model=ComponentActivationsResponse,
        responses={400: {"description": "a bad component id or prompt"}},
    )
    async def component_activations_route(
        body: ComponentActivationsRequest, request: Request
    ) -> ComponentActivationsResponse:
        """A component's value at each token of a prompt, as the scan defines it (for the
        component page's heatmap of the current prompt)."""
        from tdb.server.service import prompt_tokens
        from tdb.server.state import get_state

        nonlocal saes
        state = get_state(request)
        target = parse_target(body.component)
        if isinstance(target, ComponentIndex):
            component = target
        elif isinstance(target, NodeIndex) and target.layer is not None:
            component = ComponentIndex(target.node_type, target.layer, target.index, target.site)
        else:
            raise TdbError(
                f"component: {body.component!r} is not a component (give h<layer>.<head>, "
                "n<layer>.<neuron> or a<a|p|m><layer>.<latent>)"
            )
        loaded = state.loaded
        tokens = prompt_tokens(loaded, body.prompt, state.max_prompt_tokens, "prompt")
        if saes is None:
            saes = scan_saes(out)

        def job() -> ComponentActivationsResponse:
            return activations_response(loaded, saes or [], component, tokens)

        return await state.worker.run(job)

    return router


def scan_saes(out: Path) -> list[AttachedSae]:
    """The SAEs the scan in `out` attached (their latents are its components)."""
    from tdb.sae import load_saes

    manifest = read_manifest(out) or {}
    paths = manifest.get("identity", {}).get("saes", [])
    return [a for path in paths for a in load_saes(path)]


def activations_response(
    loaded: LoadedModel, saes: list[AttachedSae], component: ComponentIndex, tokens: list[int]
) -> ComponentActivationsResponse:
    from tdb.scan.activations import MEANING, component_activations, head_top_keys

    values = component_activations(loaded.model, saes, component, tokens)
    heads = component.node_type is NodeType.ATTENTION_HEAD
    return ComponentActivationsResponse(
        component=component.id,
        node_type=component.node_type,
        layer=component.layer,
        index=component.index,
        site=None if component.site is None else component.site.value,
        meaning=MEANING[component.node_type],
        tokens=[loaded.tokenizer.token_text(t) for t in tokens],
        token_ids=tokens,
        values=[_finite(float(v)) for v in values],
        top_keys=head_top_keys(loaded.model, component, tokens) if heads else None,
    )


def mount_scan(app: FastAPI, out: Path) -> None:
    """Serve the scan in `out` on `app` (made by `tdb.server.app.create_app`): its component
    pages and explanation routes, and explanations in `POST /api/nodes`. A TdbError when `out`
    holds no finished scan, or one of another model than the server's."""
    router = scan_router(out)
    serve_explanations(app, out)
    app.include_router(router)


def serve_explanations(app: FastAPI, out: Path) -> None:
    """Hand the explanations of the scan in `out` to `POST /api/nodes` of `app` (whose
    `scan_router(out)` serves the rest); a TdbError if the scan is of another model."""
    state = getattr(app.state, "tdb", None)
    if state is not None:
        check_model(out, read_manifest(out) or {}, state.loaded)
    app.state.explanations = ExplanationsFile(out)
