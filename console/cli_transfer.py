"""`omx pull`, `omx push` and `omx model import --from-ollama`: moving models in and out of the cluster.

Like the rest of the CLI this is an HTTP client only: pull and push show the node's Ollama progress stream
as rich bars; import reads a local Ollama store and uploads its blobs and manifests unchanged (the node
verifies every blob's sha256), so digests stay the same.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import typer

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

cli: Any = None  # omx.console.cli as it runs (it may be __main__): register() sets it

HostOpt = Annotated[
    str | None,
    typer.Option("--host", help="Node address, OLLAMA_HOST forms (default: $OMX_HOST or 127.0.0.1:11434)."),
]
InsecureOpt = Annotated[bool, typer.Option("--insecure", help="Allow a plain-HTTP registry.")]


def _progress(path: str, body: dict[str, Any], host: str | None) -> None:
    client = cli._client(host)
    view = cli.ProgressView()
    try:
        for p in client.stream("POST", path, {**body, "stream": True}):
            if p.get("status"):
                view.update(str(p["status"]), cli.number(p.get("total")), cli.number(p.get("completed")))
    finally:
        view.close()
        client.close()


def pull(name: Annotated[str, typer.Argument(help="Model name.")], insecure: InsecureOpt = False,
         host: HostOpt = None) -> None:
    """Pull a model: from the cluster's nodes that hold it, else from its registry."""
    _progress("/api/pull", {"model": name, "insecure": insecure}, host)


def push(name: Annotated[str, typer.Argument(help="Model name, HOST/NAMESPACE/MODEL:TAG.")],
         insecure: InsecureOpt = False, host: HostOpt = None) -> None:
    """Push a model to a registry."""
    _progress("/api/push", {"model": name, "insecure": insecure}, host)


def default_ollama_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def ollama_models(root: Path) -> list[tuple[str, Path]]:
    """(name, manifest path) for every `manifests/<host>/<namespace>/<model>/<tag>` file of an Ollama store."""
    base = root / "manifests"
    out = []
    for path in sorted(base.glob("*/*/*/*")):
        if path.is_file() and not path.name.startswith("."):
            host, ns, model, tag = path.relative_to(base).parts
            out.append((f"{host}/{ns}/{model}:{tag}", path))
    return out


def _blobs(data: bytes) -> list[tuple[str, int]]:
    """(digest, size) of every blob a manifest names; ValueError saying what is wrong with a malformed one."""
    try:
        manifest = json.loads(data)
    except ValueError:
        raise ValueError("the manifest is not JSON") from None
    if not isinstance(manifest, dict):
        raise ValueError("the manifest is not a JSON object")
    layers = manifest.get("layers") or []
    if not isinstance(layers, list):
        raise ValueError("the manifest's layers are not a list")
    seen: dict[str, int] = {}
    for layer in [*layers, manifest.get("config") or {}]:
        if not isinstance(layer, dict):
            raise ValueError(f"the manifest has a layer that is not an object: {json.dumps(layer)[:60]}")
        d, size = layer.get("digest"), layer.get("size") or 0
        if not (isinstance(d, str) and d.startswith("sha256:")):
            continue
        # the digest becomes a file name under blobs/: nothing but hex may reach the path
        if not _DIGEST.fullmatch(d):
            raise ValueError(f"the manifest names a malformed digest {d[:80]!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"the manifest gives blob {d} the size {json.dumps(size)[:40]}, not a byte count")
        seen.setdefault(d, size)
    return list(seen.items())


def import_models(
    from_ollama: Annotated[bool, typer.Option("--from-ollama", help="Import from a local Ollama store.")] = False,
    directory: Annotated[Path | None, typer.Argument(help="Ollama models directory (default: $OLLAMA_MODELS "
                                                          "or ~/.ollama/models).")] = None,
    host: HostOpt = None,
) -> None:
    """Copy models from a local Ollama store into the node, digests unchanged."""
    if not from_ollama:
        raise cli.CliError("say where to import from: --from-ollama [DIR]")
    root = cli.expand_user(directory or default_ollama_dir())
    models = ollama_models(root)
    if not models:
        raise cli.CliError(f"no Ollama models under {root} (expected {root / 'manifests'}/HOST/NS/MODEL/TAG)")
    client = cli._client(host)
    view = cli.ProgressView()
    failed: list[str] = []
    try:
        for name, path in models:
            try:
                _import_one(client, view, root, name, path)
            except cli.NodeUnreachable:
                raise
            except (cli.CliError, OSError, ValueError) as e:
                # one bad model (manifest, blob, a name the node refuses) must not stop the others
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                view.update(f"skipping {_shown(name)}: {reason}")
                failed.append(_shown(name))
        view.update(f"imported {len(models) - len(failed)} of {len(models)} model(s)")
    finally:
        view.close()
        client.close()
    if failed:
        raise cli.CliError(f"{len(failed)} model(s) not imported: {', '.join(failed)}")


def _shown(name: str) -> str:
    """A name from the file system, printable even when it is not UTF-8."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _import_one(client: Any, view: Any, root: Path, name: str, path: Path) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the name is not valid UTF-8") from None
    data = path.read_bytes()
    blobs = _blobs(data)
    missing = [d for d, _ in blobs if not (root / "blobs" / d.replace(":", "-")).is_file()]
    if missing:
        raise ValueError(f"blob {missing[0]} is missing from {root / 'blobs'}")
    status = f"importing {name}"
    view.update(status, total=sum(size for _, size in blobs) or 1, completed=0)
    for d, _ in blobs:
        cli.upload_blob(client, root / "blobs" / d.replace(":", "-"), d.removeprefix("sha256:"),
                        lambda n, s=status: view.advance(s, n))
    client.request("PUT", "/api/v1/manifests?" + urlencode({"model": name}), content=data,
                   headers={"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"})


def register(module: Any, app: typer.Typer, model_app: typer.Typer) -> None:
    """cli.py calls this with itself: its helpers and errors must be the running copy's (it may be __main__)."""
    global cli
    cli = module
    app.command("pull")(pull)
    app.command("push")(push)
    model_app.command("import")(import_models)
