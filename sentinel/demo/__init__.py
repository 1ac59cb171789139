"""`sentinel demo`: the detect-and-heal loop on one machine.

- `local`: a simulated GPU host, the built-in tiny MoE worker, Sentinel in act mode and
  a webhook sink; faults injected one after another, results as a table or JSON.
"""

__all__ = ["local"]
