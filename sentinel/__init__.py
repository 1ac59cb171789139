"""Sentinel: a sidecar that keeps Mixture-of-Experts inference alive on GPU hosts.

The packages follow the data flow (README, "Concepts"): `collectors` (and `logs`) observe,
`store` holds samples and events, `rules` evaluates Prometheus rule files with `promql`
(templates in `gotemplate`), `remediation` acts on workers through its backends, `notify`
tells people, `api` serves it all over HTTP, and `daemon` wires them into one process.
Around them: `config`, `cli`, `promtool` (promtool-compatible tools), `probe` (in the
worker, imports torch), `sim` and `demo` (simulation, tests, the demo).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
