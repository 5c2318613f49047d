# The stash image: the static `stash` binary plus the pinned restic it drives, on a non-root base.
# No Docker engine runs where this project is developed, so this file is kept simple and unbuilt there.
ARG RESTIC_VERSION=v0.18.1

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl

FROM golang:1.26-bookworm AS restic
ARG RESTIC_VERSION
RUN CGO_ENABLED=0 GOBIN=/out go install -trimpath -ldflags "-s -w" \
    github.com/restic/restic/cmd/restic@${RESTIC_VERSION}

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/stash /usr/local/bin/stash
COPY --from=restic /out/restic /usr/local/bin/restic
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/stash"]
