# Multi-stage build of the ecst binary; the runtime image holds the binary and CA roots only.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY tests ./tests
COPY connector.toml ./
RUN cargo build --release --locked --bin ecst

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libcurl4 \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 ecst
COPY --from=build /src/target/release/ecst /usr/local/bin/ecst
USER ecst
EXPOSE 9187
ENTRYPOINT ["ecst", "--config", "/etc/ecst/connector.toml"]
CMD ["run"]
