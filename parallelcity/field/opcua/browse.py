"""Walk an OPC UA server's address space and write the points table a scenario can use.

``parallelcity browse ENDPOINT`` follows hierarchical references from the
Objects folder (one Browse per folder or object, breadth first), keeps the
numeric variables of one namespace, and prints ``[[field.points]]`` entries:
``name`` from the browse path (``plant.T_supply``), ``node`` as the scenario
writes NodeIds, and a ``max_age_s`` to review.  Writable variables (AccessLevel
CurrentWrite) are marked: they may be inputs, or setpoints that change only when
written, which as points want ``event_driven = true`` (the line is there,
commented out).  The names still have to be mapped to model signals by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from asyncua import ua
from asyncua.client.client import Client
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.uaerrors import UaError

from parallelcity.errors import FieldConnectionError, NodeMappingError
from parallelcity.field.opcua.session import (
    ClientSecurity,
    connect_client,
    deadline,
    raised_by_asyncua,
)

NUMERIC_TYPES = {
    ObjectIds.Boolean,
    ObjectIds.SByte,
    ObjectIds.Byte,
    ObjectIds.Int16,
    ObjectIds.UInt16,
    ObjectIds.Int32,
    ObjectIds.UInt32,
    ObjectIds.Int64,
    ObjectIds.UInt64,
    ObjectIds.Float,
    ObjectIds.Double,
}
INTEGER_TYPES = NUMERIC_TYPES - {ObjectIds.Boolean, ObjectIds.Float, ObjectIds.Double}
BATCH = 500


@dataclass(frozen=True)
class BrowsedPoint:
    name: str  # dotted browse path below Objects
    node: str  # scenario NodeId ("s=..." or "i=...")
    writable: bool
    type: str = "float"  # the point's `type`: float (Float, Double), int, bool (Boolean)


@dataclass(frozen=True)
class BrowseResult:
    endpoint: str
    namespace: str
    points: tuple[BrowsedPoint, ...]
    skipped: int  # variables of the namespace that are not numeric or not plain NodeIds


def _scenario_node(nodeid: ua.NodeId) -> str | None:
    ident = nodeid.Identifier
    if isinstance(ident, str):
        return f"s={ident}"
    if isinstance(ident, int):
        return f"i={ident}"
    return None


def _name_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_") or "x"


async def browse(
    endpoint: str,
    security: ClientSecurity,
    *,
    namespace: str | None = None,
    max_nodes: int = 200_000,
    timeout_s: float = 10.0,
) -> BrowseResult:
    """The numeric variables of ``namespace`` (default: the first one that has any)."""
    client = await connect_client(
        endpoint, security, timeout_s=timeout_s, name="parallelcity browse"
    )
    try:
        async with deadline(max(60.0, timeout_s)):
            return await _walk(client, endpoint, namespace, max_nodes)
    except (OSError, TimeoutError, UaError) as exc:
        raise FieldConnectionError(f"browsing {endpoint} failed: {exc!r}") from exc
    except Exception as exc:
        if raised_by_asyncua(exc):
            raise FieldConnectionError(f"browsing {endpoint} failed: {exc!r}") from exc
        raise
    finally:
        try:
            async with deadline(timeout_s):
                await client.disconnect()
        except Exception:  # leaving anyway
            client.disconnect_socket()


async def _walk(
    client: Client, endpoint: str, namespace: str | None, max_nodes: int
) -> BrowseResult:
    namespaces = await client.get_namespace_array()
    wanted: int | None = None
    if namespace is not None:
        if namespace not in namespaces:
            raise NodeMappingError(
                f"namespace {namespace!r} is not on {endpoint} (it has: {', '.join(namespaces)})"
            )
        wanted = namespaces.index(namespace)
    queue: list[tuple[ua.NodeId, tuple[str, ...]]] = [
        (ua.NodeId(ua.Int32(ObjectIds.ObjectsFolder)), ())
    ]
    seen: set[ua.NodeId] = set()
    variables: list[tuple[ua.NodeId, tuple[str, ...]]] = []
    while queue and len(seen) < max_nodes:
        parent, path = queue.pop(0)
        refs = await client.get_node(parent).get_children_descriptions(
            refs=ObjectIds.HierarchicalReferences
        )
        for ref in refs:
            nodeid = ref.NodeId
            if nodeid in seen or nodeid.NamespaceIndex == 0:
                continue
            seen.add(nodeid)
            here = (*path, _name_part(ref.BrowseName.Name or str(nodeid.Identifier)))
            if ref.NodeClass == ua.NodeClass.Variable:
                variables.append((nodeid, here))
            elif ref.NodeClass == ua.NodeClass.Object:
                queue.append((nodeid, here))
    if wanted is None:
        used = sorted({n.NamespaceIndex for n, _ in variables})
        if not used:
            raise NodeMappingError(f"{endpoint} has no variables outside namespace 0")
        wanted = used[0]
    mine = [(n, p) for n, p in variables if n.NamespaceIndex == wanted]
    points: list[BrowsedPoint] = []
    skipped = 0
    for i in range(0, len(mine), BATCH):
        batch = mine[i : i + BATCH]
        nodes = [client.get_node(n) for n, _ in batch]
        types = await client.read_attributes(nodes, AttributeIds.DataType)
        access = await client.read_attributes(nodes, AttributeIds.UserAccessLevel)
        for (nodeid, path), dt, acc in zip(batch, types, access, strict=True):
            datatype = dt.Value.Value if dt.Value is not None else None
            text = _scenario_node(nodeid)
            numeric = (
                isinstance(datatype, ua.NodeId)
                and datatype.NamespaceIndex == 0
                and datatype.Identifier in NUMERIC_TYPES
            )
            if not numeric or text is None:
                skipped += 1
                continue
            level = acc.Value.Value if acc.Value is not None else 0
            writable = bool(int(level or 0) & (1 << ua.AccessLevel.CurrentWrite))
            assert isinstance(datatype, ua.NodeId)
            kind = (
                "bool"
                if datatype.Identifier == ObjectIds.Boolean
                else "int"
                if datatype.Identifier in INTEGER_TYPES
                else "float"
            )
            points.append(BrowsedPoint(".".join(path), text, writable, kind))
    return BrowseResult(endpoint, namespaces[wanted], tuple(points), skipped)


def points_toml(result: BrowseResult, max_age_s: float) -> str:
    """The ``[field]`` namespace and one ``[[field.points]]`` entry per variable."""
    lines = [
        f"# parallelcity browse {result.endpoint}: {len(result.points)} numeric variables",
        f"# ({result.skipped} others skipped). Map each name to a model output, or delete it.",
        "[field]",
        f'namespace = "{result.namespace}"',
        "",
    ]
    for p in result.points:
        if p.writable:
            lines.append(
                "# writable: may be a [[field.inputs]] entry instead; a setpoint that changes "
                "only when written stays fresh with event_driven = true"
            )
        lines += [
            "[[field.points]]",
            f'name = "{p.name}"',
            f'node = "{p.node}"',
            f"max_age_s = {max_age_s:g}",
        ]
        if p.type != "float":  # float is the default; another type read as float is refused
            lines.append(f'type = "{p.type}"')
        if p.writable:
            lines.append("# event_driven = true")
        lines.append("")
    return "\n".join(lines)
