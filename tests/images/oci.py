#!/usr/bin/env python3
"""Writes an OCI image archive (a tar of an OCI image layout) without a registry or a daemon.

    oci.py --name stash.local/stash:dev --out stash.tar \
        --layer rootfs.tar --layer extra-dir/ \
        --user 65532:65532 --entrypoint /usr/local/bin/stash --env PATH=/usr/local/bin:/usr/bin:/bin

Each --layer is a tar file (used as it is: a rootfs tarball from mmdebstrap, say) or a directory (tarred
with its owners and modes, relative to its root). Layers stack in the order given. The archive carries
the image name in the annotations `ctr images import` reads, so a Pod with `imagePullPolicy: Never`
finds it under exactly that name. Output is reproducible: no timestamps but --created, sorted entries.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile


def layer_tar(source, scratch):
    """Returns the path of an uncompressed tar holding the layer `source` (a tar file or a directory)."""
    if os.path.isfile(source):
        return source
    if not os.path.isdir(source):
        raise SystemExit(f"oci.py: layer {source!r} is neither a tar file nor a directory")
    path = os.path.join(scratch, f"layer-{len(os.listdir(scratch))}.tar")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(dirs) + sorted(files):
                full = os.path.join(root, name)
                info = tar.gettarinfo(full, arcname=os.path.relpath(full, source))
                info.mtime = 0
                if info.isfile():
                    with open(full, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    return path


def blob(out, data):
    """Adds a content-addressed blob to the layout tar `out`; returns (digest, size)."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    add(out, "blobs/sha256/" + digest.split(":", 1)[1], data)
    return digest, len(data)


def add(out, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    out.addfile(info, io.BytesIO(data))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="full image name with tag, e.g. stash.local/stash:dev")
    p.add_argument("--out", required=True)
    p.add_argument("--layer", action="append", required=True)
    p.add_argument("--user", default="")
    p.add_argument("--entrypoint", action="append", default=[])
    p.add_argument("--cmd", action="append", default=[])
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--workdir", default="/")
    p.add_argument("--label", action="append", default=[], help="key=value")
    p.add_argument("--created", default="1970-01-01T00:00:00Z")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        layers, diff_ids = [], []
        for source in args.layer:
            with open(layer_tar(source, scratch), "rb") as f:
                raw = f.read()
            diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
            layers.append(gzip.compress(raw, compresslevel=6, mtime=0))

        config = {
            "created": args.created,
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "User": args.user,
                "Env": args.env,
                "Entrypoint": args.entrypoint or None,
                "Cmd": args.cmd or None,
                "WorkingDir": args.workdir,
                "Labels": dict(kv.split("=", 1) for kv in args.label) or None,
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created": args.created, "created_by": "tests/images/oci.py"} for _ in layers],
        }
        config["config"] = {k: v for k, v in config["config"].items() if v is not None}

        tmp_out = args.out + ".partial"
        with tarfile.open(tmp_out, "w", format=tarfile.PAX_FORMAT) as out:
            add(out, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            layer_descs = []
            for data in layers:
                digest, size = blob(out, data)
                layer_descs.append(
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}
                )
            config_digest, config_size = blob(out, json.dumps(config, sort_keys=True).encode())
            manifest = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": config_size,
                },
                "layers": layer_descs,
            }
            manifest_digest, manifest_size = blob(out, json.dumps(manifest, sort_keys=True).encode())
            tag = args.name.rsplit(":", 1)[1] if ":" in args.name.rsplit("/", 1)[-1] else "latest"
            index = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": manifest_digest,
                        "size": manifest_size,
                        "platform": {"architecture": "amd64", "os": "linux"},
                        "annotations": {
                            "io.containerd.image.name": args.name,
                            "org.opencontainers.image.ref.name": tag,
                        },
                    }
                ],
            }
            add(out, "index.json", json.dumps(index, sort_keys=True).encode())
        os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
