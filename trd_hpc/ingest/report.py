"""``ingest_report.json`` / ``.html``: what one pass over a spec's sources found.

Written by ``trd-hpc ingest`` into the cohort directory, and by ``trd-hpc ingest --check
--report DIR`` wherever asked (a check writes nothing unless asked): every problem, the
subjects kept and dropped with their ids and reasons, how many subjects have each source,
values imputed, each image's geometry (shape, voxel size, orientation, time step) and the
genotype QC's removals.
"""

from __future__ import annotations

from pathlib import Path

from trd_hpc.fsio import atomic_write_json, atomic_write_text

TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><title>ingest report: {{ r.spec }}</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
.bad{color:#a00}</style></head><body>
<h1>Ingest report</h1>
<p>Spec <code>{{ r.spec }}</code>: {{ r.status }}. {{ r.table_rows }} table rows, {{ r.kept }} kept,
{{ r.dropped | length }} dropped.</p>
{% if r.problems %}<h2 class="bad">{{ r.problems | length }} problem(s)</h2><ol>
{% for p in r.problems %}<li class="bad">{{ p }}</li>{% endfor %}</ol>{% endif %}
<h2>Sources per subject</h2><table><tr><th>source</th><th>subjects with it</th></tr>
{% for k, v in r.availability.items() if k != "of" %}<tr><td>{{ k }}</td><td>{{ v }} of {{ r.availability.of }}</td></tr>
{% endfor %}</table>
{% if r.dropped %}<h2>Dropped subjects</h2><table><tr><th>participant_id</th><th>reason</th></tr>
{% for d in r.dropped %}<tr><td>{{ d.participant_id }}</td><td>{{ d.reason }}</td></tr>{% endfor %}</table>{% endif %}
{% if r.imputed %}<h2>Imputed values</h2><table><tr><th>column</th><th>cells</th></tr>
{% for k, v in r.imputed.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>{% endif %}
{% if r.snp_qc %}<h2>Genotype QC</h2><p>{{ r.snp_qc.candidates }} candidate variants, {{ r.snp_qc.kept }} kept,
fitted on {{ r.snp_qc.subjects }} {{ r.snp_qc.fitted_on }} subjects.</p><table><tr><th>filter</th><th>threshold</th>
<th>variants removed</th></tr>{% for k, v in r.snp_qc.removed.items() %}<tr><td>{{ k }}</td><td>{{ v.threshold }}</td>
<td>{{ v.variants }}</td></tr>{% endfor %}</table>{% endif %}
{% if r.geometry %}<h2>Image geometry</h2><table><tr><th>participant_id</th><th>shape</th><th>voxel (mm)</th>
<th>orientation</th><th>TR (s)</th></tr>{% for k, g in r.geometry.items() %}<tr><td>{{ k }}</td><td>{{ g.shape }}</td>
<td>{{ g.voxel_mm }}</td><td>{{ g.orientation }}</td><td>{{ g.t_r if g.t_r is not none else "" }}</td></tr>
{% endfor %}</table>{% endif %}
</body></html>
"""


def build(spec_path: Path, problems, cfg=None) -> dict:
    """The report of one pass: ``problems`` (trd_hpc.ingest.resolve.Problems) and, after a
    successful one, the resolved cohort config's source record."""
    facts = problems.facts
    r = {
        "spec": str(spec_path),
        "status": "ok" if not problems.items else "problems found",
        "problems": list(problems.items),
        "table_rows": facts.get("table_rows"),
        "kept": facts.get("kept"),
        "dropped": facts.get("dropped", []),
        "availability": facts.get("availability", {"of": facts.get("table_rows")}),
        "geometry": facts.get("geometry", {}),
        "imputed": {},
        "snp_qc": None,
    }
    if cfg is not None:
        from trd_hpc.ingest.resolve import source_record

        src = source_record(cfg)["source"]
        r["imputed"] = (src.get("clinical") or {}).get("imputed", {})
        r["snp_qc"] = src.get("snp_qc")
    return r


def write(report: dict, folder: Path) -> tuple[Path, Path]:
    import jinja2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    js, html = folder / "ingest_report.json", folder / "ingest_report.html"
    atomic_write_json(js, report, indent=1)
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    atomic_write_text(html, env.from_string(TEMPLATE).render(r=report))
    return js, html
