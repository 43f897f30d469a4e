"""Re-vendor KubeRay's CRD schemas (the v1 ``openAPIV3Schema`` of RayCluster, RayJob, RayCronJob).

    python infra/k8s/schemas/refresh.py --ref v1.7.0                      # from GitHub (raw files of a tag)
    python infra/k8s/schemas/refresh.py --git path/to/kuberay --ref HEAD  # from a local clone (bare is fine)

Writes ``ray.io_<plural>.v1.json.gz`` next to this file: compact JSON, gzip with mtime 0, so a refresh with
no upstream change leaves the files byte-identical. Then update README.md here with the printed source.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRD_DIR = "ray-operator/config/crd/bases"
PLURALS = ("rayclusters", "rayjobs", "raycronjobs")
VERSION = "v1"
RAW = "https://raw.githubusercontent.com/ray-project/kuberay/{ref}/{path}"


def _git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True).stdout.strip()


def crd_text(plural: str, ref: str, git_dir: str | None) -> str:
    path = f"{CRD_DIR}/ray.io_{plural}.yaml"
    if git_dir:
        return _git(git_dir, "show", f"{ref}:{path}")
    with urllib.request.urlopen(RAW.format(ref=ref, path=path), timeout=60) as r:
        return r.read().decode()


def open_api_schema(crd: dict, version: str = VERSION) -> dict:
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def write(plural: str, schema: dict) -> Path:
    out = HERE / f"ray.io_{plural}.{VERSION}.json.gz"
    data = json.dumps(schema, separators=(",", ":"), sort_keys=True).encode()
    with open(out, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
        gz.write(data)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default="master", help="tag, branch or commit of ray-project/kuberay")
    p.add_argument("--git", help="a local kuberay git directory to read from instead of GitHub")
    args = p.parse_args()
    for plural in PLURALS:
        crd = yaml.safe_load(crd_text(plural, args.ref, args.git))
        print(f"wrote {write(plural, open_api_schema(crd)).relative_to(HERE)}")
    if args.git:
        commit = _git(args.git, "rev-parse", f"{args.ref}^{{commit}}")
        described = _git(args.git, "describe", "--tags", commit)
        print(f"source: ray-project/kuberay {CRD_DIR} at {commit} (git describe: {described})")
    else:
        print(f"source: ray-project/kuberay {CRD_DIR} at {args.ref}")


if __name__ == "__main__":
    main()
