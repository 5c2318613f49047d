# The stash image: the operator, executor and sidecar binary, the pinned restic it drives, and the database
# clients its database members run (pg_dump/psql from PostgreSQL 15, mysqldump/mysql from MariaDB 10.11),
# on Debian bookworm, as the non-root user 65532.
# tests/images/build.sh builds the same image without a Docker engine (image/stash.packages is the package
# list both read); tests/image_parity.rs fails when the two differ in packages, user, entrypoint, env or files.
ARG RESTIC_VERSION=v0.18.1

# glibc build: the final stage is the same Debian release, so the C library matches.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin stash

FROM golang:1.26-bookworm AS restic
ARG RESTIC_VERSION
RUN CGO_ENABLED=0 GOBIN=/out go install -trimpath -ldflags "-s -w" \
    github.com/restic/restic/cmd/restic@${RESTIC_VERSION}

FROM debian:bookworm-slim
COPY image/stash.packages /tmp/stash.packages
RUN apt-get update \
    && sed 's/#.*//' /tmp/stash.packages | xargs env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    && rm -rf /var/lib/apt/lists/* /tmp/stash.packages
# The same user as tests/images/build.sh writes (distroless's nonroot).
RUN echo "nonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin" >>/etc/passwd \
    && echo "nonroot:x:65532:" >>/etc/group \
    && mkdir -m 0755 /home/nonroot && chown 65532:65532 /home/nonroot
COPY --from=build /src/target/release/stash /usr/local/bin/stash
COPY --from=restic /out/restic /usr/local/bin/restic
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/home/nonroot
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/stash"]
