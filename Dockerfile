# A small static image of rekey (and the kubectl plugin).
# Not built in this project's CI: the development machines have no container
# runtime. Build it where one exists:  docker build -t rekey:dev .
FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl && apt-get update && apt-get install -y --no-install-recommends musl-tools
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin rekey --bin kubectl-rekey

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/rekey /rekey
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/kubectl-rekey /kubectl-rekey
USER 65532:65532
ENTRYPOINT ["/rekey"]
CMD ["run"]
