#!/usr/bin/env python3
"""Checks that the alert rules and the Grafana dashboard only use what ecst exports.

Run by `dev/stack lint-alerts` (after promtool). Reads:

* src/metrics.rs: every metric const (`pub const X: &str = "ecst_..."`), its type from its doc
  comment (Gauge / Counter / Histogram) and the label keys (`*_LABEL`);
* src/**/*.rs: where each metric is emitted (`counter!` / `gauge!` / `histogram!`) and with
  which labels (the `*_LABEL` consts named in the macro's arguments): the labels a series
  really has. Labels built outside the macro call are not seen;
* deploy/prometheus/ecst-rules.yml, ecst-rules.test.yml and deploy/grafana/ecst.json.

Fails (exit 1) when an expression names a metric src/ does not emit, a label that metric is not
emitted with (besides the target labels `job` and `instance`, and `le` on buckets), uses a
histogram without `_bucket`/`_sum`/`_count`, takes rate()/increase()/resets() of a gauge or
deriv()/delta() of a counter; when a test's input series is not such a series; when an alert has
no test case where it fires or none where it stays silent; or when the dashboard is not valid JSON
on the `${DS_PROMETHEUS}` input. The PromQL reader is a tokenizer, not a parser: enough for these
files, and promtool has parsed the rules before.
"""

import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
METRICS_RS = ROOT / "src" / "metrics.rs"
RULES = ROOT / "deploy" / "prometheus" / "ecst-rules.yml"
TESTS = ROOT / "deploy" / "prometheus" / "ecst-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "ecst.json"

TARGET_LABELS = {"job", "instance"}
# Series Prometheus makes itself: name -> labels (None: any).
SYNTHETIC = {"up": set(), "ALERTS": None, "ALERTS_FOR_STATE": None}
COUNTER_FUNCS = {"rate", "irate", "increase", "resets"}
GAUGE_FUNCS = {"deriv", "delta", "idelta", "predict_linear"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile"}
KEYWORDS = {"and", "or", "unless", "offset", "bool", "atan2", "inf", "nan"} | GROUPING
DATASOURCE_UID = "${DS_PROMETHEUS}"

errors = []


def error(where, msg):
    errors.append(f"{where}: {msg}")


# --- what ecst exports ----------------------------------------------------------------------


def read_metrics():
    """name -> {"type", "labels", "const"} from src/metrics.rs and the emission sites in src/."""
    text = METRICS_RS.read_text()
    consts, label_keys = {}, {}
    doc = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("///"):
            doc.append(s[3:].strip())
            continue
        m = re.match(r'pub const (\w+): &str = "([^"]+)";', s)
        if m:
            const, value = m.groups()
            if const.endswith("_LABEL"):
                label_keys[const] = value
            elif value.startswith(("ecst_", "process_")):
                kind = re.match(r"\w*", doc[0] if doc else "").group().lower()
                if kind not in {"gauge", "counter", "histogram"}:
                    error(METRICS_RS.name, f"{const}: doc comment does not start with its type")
                consts[const] = {"name": value, "type": kind}
        if not s.startswith("#["):
            doc = []
    metrics = {}
    macro = re.compile(
        r"\b(counter|gauge|histogram)!\(\s*(?:(?:m|metrics|crate::metrics)::)?([A-Z_]+)\b"
    )
    for path in sorted((ROOT / "src").rglob("*.rs")):
        src = path.read_text()
        for m in macro.finditer(src):
            kind, const = m.groups()
            if const not in consts:
                continue
            # The macro's arguments, up to its closing parenthesis.
            depth, i = 1, m.end()
            while i < len(src) and depth:
                depth += {"(": 1, ")": -1}.get(src[i], 0)
                i += 1
            args = src[m.end() : i - 1]
            # Every label const named in the arguments is a key: `m::X_LABEL => v` pairs, and
            # also `(m::X_LABEL, v)` tuples or `Label::new(m::X_LABEL, v)` in a label slice.
            labels = set()
            for lc in re.findall(r"\b([A-Z][A-Z_]*_LABEL)\b", args):
                if lc not in label_keys:
                    error(path.relative_to(ROOT), f"{const}: unknown label const {lc}")
                else:
                    labels.add(label_keys[lc])
            c = consts[const]
            if kind != c["type"]:
                error(path.relative_to(ROOT), f"{c['name']} is a {c['type']} but emitted with {kind}!")
            e = metrics.setdefault(c["name"], {"type": c["type"], "labels": set(), "const": const})
            e["labels"] |= labels
    for const, c in consts.items():
        if c["name"] not in metrics:
            print(f"note: {c['name']} ({const}) is defined but never emitted", file=sys.stderr)
    return metrics


def series_names(metrics):
    """Every series name a scrape of ecst can show -> (type, labels, base name)."""
    out = {}
    for name, m in metrics.items():
        if m["type"] == "histogram":
            out[name + "_bucket"] = ("histogram", m["labels"] | {"le"}, name)
            out[name + "_sum"] = ("histogram", m["labels"], name)
            out[name + "_count"] = ("histogram", m["labels"], name)
        else:
            out[name] = (m["type"], m["labels"], name)
    return out


# --- a PromQL tokenizer -----------------------------------------------------------------------

TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
  | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|0x[0-9a-fA-F]+)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}\[\]@:])
    """,
    re.VERBOSE,
)


def tokenize(expr, where):
    toks, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            error(where, f"cannot read the expression at {expr[pos:pos + 20]!r}")
            return []
        pos = m.end()
        if m.lastgroup not in ("ws", "comment"):
            toks.append((m.lastgroup, m.group()))
    return toks


def unquote(s):
    return s[1:-1]


def check_expr(expr, where, series, records):
    """Checks one expression; returns the metric names it uses."""
    toks = tokenize(expr, where)
    used, allowed = [], set()  # allowed: labels of the expression's selectors
    grouping_refs = []
    funcs = []  # stack of (function name, paren depth)
    depth = 0
    i = 0

    def selector(name, i):
        """Reads an optional {matchers} at toks[i]; returns (next index, matcher labels, names)."""
        labels, names = [], []
        if i < len(toks) and toks[i][1] == "{":
            i += 1
            while i < len(toks) and toks[i][1] != "}":
                if toks[i][0] == "ident" and i + 2 < len(toks) and toks[i + 1][1] in ("=", "!=", "=~", "!~"):
                    label, op, val = toks[i][1], toks[i + 1][1], toks[i + 2]
                    if label == "__name__" and val[0] == "string":
                        v = unquote(val[1])
                        names += v.split("|") if op == "=~" else [v]
                    else:
                        labels.append(label)
                    i += 3
                else:
                    i += 1
            i += 1
        return i, labels, names

    def use(name, matcher_labels):
        if name in records:
            used.append(name)
            allowed.update(TARGET_LABELS | set(matcher_labels))  # a recording rule's own labels
            return
        if name in SYNTHETIC:
            labels = SYNTHETIC[name]
            if labels is None:
                allowed.update(matcher_labels)
                allowed.update({"alertname", "alertstate"})
                return
            kind = "gauge"
        elif name in series:
            kind, labels, base = series[name]
        else:
            hint = ""
            if any(k.startswith(name + "_") for k in series):
                hint = " (a histogram: use its _bucket, _sum or _count)"
            error(where, f"unknown metric {name}{hint}")
            return
        used.append(name)
        ok = labels | TARGET_LABELS | {"__name__"}
        for label in matcher_labels:
            if label not in ok:
                error(where, f"{name} has no label {label!r} (it has: {', '.join(sorted(ok - {'__name__'}))})")
        allowed.update(ok)
        if funcs:
            f = funcs[-1][0]
            if f in COUNTER_FUNCS and kind == "gauge":
                error(where, f"{f}() of {name}, a gauge (use deriv/delta/changes)")
            if f in GAUGE_FUNCS and kind == "counter":
                error(where, f"{f}() of {name}, a counter (use rate/increase)")

    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else None
        if text == "[":  # a range or subquery: durations and variables only
            while i < len(toks) and toks[i][1] != "]":
                i += 1
            i += 1
            continue
        if text == "(":
            depth += 1
        elif text == ")":
            if funcs and funcs[-1][1] == depth:
                funcs.pop()
            depth -= 1
        elif text == "{":  # a selector with no name before it: {__name__=...}
            j, labels, names = selector(None, i)
            for n in names:
                use(n, labels)
            if not names:
                error(where, "a selector without a metric name")
            i = j
            continue
        elif kind == "ident":
            if text in GROUPING:
                i += 1
                if i < len(toks) and toks[i][1] == "(":
                    i += 1
                    while i < len(toks) and toks[i][1] != ")":
                        if toks[i][0] == "ident":
                            grouping_refs.append(toks[i][1])
                        i += 1
                    i += 1
                continue
            if text == "offset":
                i += 2
                continue
            if text in KEYWORDS or text in AGGREGATIONS:
                pass
            elif nxt == "(":  # a function or an aggregation
                funcs.append((text, depth + 1))
            else:
                j, labels, names = selector(text, i + 1)
                use(text, labels)
                i = j
                continue
        i += 1
    for label in grouping_refs:
        if label not in allowed:
            error(where, f"groups by {label!r}, which none of its series has")
    return used


# --- the files --------------------------------------------------------------------------------


def main():
    metrics = read_metrics()
    series = series_names(metrics)

    rules = yaml.safe_load(RULES.read_text())
    records = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    alerts = {}
    used_rules = set()
    for g in rules["groups"]:
        for r in g["rules"]:
            name = r.get("alert") or r.get("record")
            where = f"{RULES.relative_to(ROOT)}: {name}"
            used_rules |= set(check_expr(r["expr"], where, series, records))
            if "alert" in r:
                alerts[r["alert"]] = {"fires": False, "silent": False}

    tests = yaml.safe_load(TESTS.read_text())
    for t in tests.get("tests", []):
        for s in t.get("input_series", []):
            where = f"{TESTS.relative_to(ROOT)}: {t.get('name', '?')}"
            check_expr(s["series"], where + ": input series", series, records)
        for c in t.get("alert_rule_test", []):
            a = c["alertname"]
            if a not in alerts:
                error(TESTS.relative_to(ROOT), f"tests {a}, which ecst-rules.yml does not define")
                continue
            alerts[a]["fires" if c.get("exp_alerts") else "silent"] = True
    for a, seen in sorted(alerts.items()):
        if not seen["fires"]:
            error(TESTS.relative_to(ROOT), f"{a}: no case where it fires")
        if not seen["silent"]:
            error(TESTS.relative_to(ROOT), f"{a}: no case where it stays silent (exp_alerts: [])")

    used_dash = set()
    where = DASHBOARD.relative_to(ROOT)
    try:
        dash = json.loads(DASHBOARD.read_text())
    except json.JSONDecodeError as e:
        error(where, f"not valid JSON: {e}")
        dash = None
    if dash is not None:
        if not any(i.get("name") == "DS_PROMETHEUS" and i.get("pluginId") == "prometheus" for i in dash.get("__inputs", [])):
            error(where, "no __inputs entry DS_PROMETHEUS (a prometheus datasource)")
        if not isinstance(dash.get("schemaVersion"), int):
            error(where, "no schemaVersion")
        ids = []

        def panels(ps):
            for p in ps:
                yield p
                yield from panels(p.get("panels", []))

        for p in panels(dash.get("panels", [])):
            ids.append(p.get("id"))
            pw = f"{where}: panel {p.get('id')} {p.get('title')!r}"
            if "gridPos" not in p:
                error(pw, "no gridPos")
            if p.get("type") == "row":
                continue
            for d in [p.get("datasource")] + [t.get("datasource") for t in p.get("targets", [])]:
                if not isinstance(d, dict) or d.get("uid") != DATASOURCE_UID:
                    error(pw, f"datasource is {d!r}, not the {DATASOURCE_UID} input")
            if not p.get("targets"):
                error(pw, "no query")
            for t in p.get("targets", []):
                used_dash |= set(check_expr(t.get("expr", ""), pw, series, records))
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            error(where, f"panel ids used twice: {sorted(dup)}")
        for v in dash.get("templating", {}).get("list", []):
            vw = f"{where}: variable {v.get('name')}"
            if v.get("type") != "query":
                continue
            if (v.get("datasource") or {}).get("uid") != DATASOURCE_UID:
                error(vw, f"datasource is not the {DATASOURCE_UID} input")
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", q)
            if m:
                used_dash |= set(check_expr(m.group(1), vw, series, records))
                # The label asked for must be one the series has.
                check_expr(f"sum by ({m.group(2)}) ({m.group(1)})", vw, series, records)
            else:
                used_dash |= set(check_expr(q, vw, series, records))

    bases = lambda names: {series[n][2] for n in names if n in series}
    unused = sorted(set(metrics) - bases(used_rules) - bases(used_dash))
    print(
        f"check_alert_metrics: {len(metrics)} metrics emitted by src/; the rules use "
        f"{len(bases(used_rules))}, the dashboard {len(bases(used_dash))}; {len(alerts)} alerts, "
        f"each with cases that fire and stay silent" + ("" if errors else "; ok"),
        file=sys.stderr,
    )
    if unused:
        print(f"note: in neither: {', '.join(unused)}", file=sys.stderr)
    for e in errors:
        print(f"ERROR: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
