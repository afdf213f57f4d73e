from dataclasses import dataclass
from typing import Literal

from runtime import Runtime


@dataclass
class Incident:
    status: Literal["investigating", "resolved"]
    severity: Literal["minor", "major"]


def derive(change):
    return ["incident.resolved"] if change.delta.get("status") == "resolved" else []


rt = Runtime()
incidents = rt.define_entity("incident", Incident)
rt.register_change_deriver("incident", derive)
rt.on_trigger("incident.resolved", lambda event, payload, change: print(event))

with rt:
    incidents.mutate(
        "inc-1", lambda prev: {"status": "investigating", "severity": "major"}
    )
    incidents.mutate("inc-1", lambda prev: {**prev, "status": "resolved"})
    rt.drain()

for row in incidents.history("inc-1", field="status"):
    print(row.seq, row.before, "->", row.after)
