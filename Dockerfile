# backup-sidecar image: the Python CLI + the PostgreSQL client tools, non-root, no secrets inside.
#
#   docker build -t backup-sidecar .                                    # pg_dump 19 from apt.postgresql.org
#   docker build --build-arg PG_MAJOR=18 -t backup-sidecar:pg18 .       # another major from the same repo
#   docker build --build-arg PG_CLIENT_SOURCE=debian -t backup-sidecar . # the distribution's client, no PGDG
#
# Which servers can it back up? pg_dump/pg_dumpall N dump servers from 9.2 up to N and refuse newer ones;
# pg_restore/psql N read archives written by any pg_dump <= N. So the client must be at least as new as the
# newest server it will ever meet:
#   PG_CLIENT_SOURCE=pgdg   (default) postgresql-client-${PG_MAJOR} from the PostgreSQL project's apt
#                           repository: PG_MAJOR=19 (default; 19 is the newest major, released 2026-11-19)
#                           handles servers 9.2-19; PG_MAJOR=18 handles 9.2-18, and so on.
#   PG_CLIENT_SOURCE=debian the base distribution's postgresql-client; PG_MAJOR is ignored:
#                           trixie (default base) ships 17 -> servers 9.2-17;
#                           BASE_IMAGE=debian:bookworm-slim ships 15 -> servers 9.2-15.
# Run `docker run --rm --entrypoint pg_dump IMAGE --version` to see what an image carries.

ARG BASE_IMAGE=debian:trixie-slim

# ---------------------------------------------------------------------------------------------------------
# builder: a virtualenv in /opt/venv holding the application and its pinned dependencies (wheels only, so
# no compiler is needed). It is built on the same base as the runtime so the venv's python3 symlink and
# any binary wheels match the interpreter they will run on.
FROM ${BASE_IMAGE} AS builder
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# postgresql-common is installed here only for the apt.postgresql.org signing key it ships
# (/usr/share/postgresql-common/pgdg/): the key arrives signed by the Debian archive, with no download
# from a web server and no fingerprint to keep up to date. The runtime stage copies just that file.
# Debian package versions are not pinned: the base image's suite and its security updates decide them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv postgresql-common \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first (their own layer, rebuilt only when pyproject.toml changes): the pins live in
# pyproject.toml, so read them from there instead of keeping a second list.
COPY pyproject.toml ./
RUN python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/requirements.txt \
 && pip install --only-binary=:all: -r /tmp/requirements.txt
COPY README.md ./
COPY app ./app
COPY healthcheck ./healthcheck
# pip itself is removed afterwards: the runtime installs nothing, and 12 MB less to scan and patch.
RUN pip install --no-deps . \
 && pip check \
 && pip uninstall -y pip

# ---------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG DEBIAN_FRONTEND=noninteractive
ARG PG_CLIENT_SOURCE=pgdg
ARG PG_MAJOR=19
ARG VERSION=0.1.0
ARG BASE_IMAGE
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

LABEL org.opencontainers.image.title="backup-sidecar" \
      org.opencontainers.image.description="PostgreSQL backup sidecar: scheduled, streamed, checksummed backups to S3/MinIO and a NAS directory" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.backup-sidecar.pg-client-source="${PG_CLIENT_SOURCE}"

COPY --from=builder /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc /usr/share/keyrings/apt.postgresql.org.asc
# The dpkg excludes and `apt-get clean` are what the official slim images already configure; spelled out
# here so the image stays small on any base (a debootstrapped one left 150 MB of .debs, docs and locales).
# perl comes in as a dependency of postgresql-client-common (pg_wrapper); it cannot be left out.
# hadolint ignore=DL3008
RUN printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
      'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
      > /etc/dpkg/dpkg.cfg.d/90-slim \
 && apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 tzdata mariadb-client age \
 && case "${PG_CLIENT_SOURCE}" in \
      pgdg) \
        . /etc/os-release \
        && printf 'Types: deb\nURIs: https://apt.postgresql.org/pub/repos/apt\nSuites: %s-pgdg\nComponents: main\nSigned-By: /usr/share/keyrings/apt.postgresql.org.asc\n' \
             "${VERSION_CODENAME}" > /etc/apt/sources.list.d/pgdg.sources \
        && apt-get update -o APT::Update::Error-Mode=any \
        && apt-get install -y --no-install-recommends "postgresql-client-${PG_MAJOR}" ;; \
      debian) \
        rm /usr/share/keyrings/apt.postgresql.org.asc \
        && apt-get install -y --no-install-recommends postgresql-client ;; \
      *) echo "PG_CLIENT_SOURCE must be pgdg or debian, not '${PG_CLIENT_SOURCE}'" >&2; exit 2 ;; \
    esac \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/dpkg.log \
 && pg_dump --version && pg_restore --version && psql --version && pg_dumpall --version \
 && mariadb-dump --version && mariadb --version \
 && groupadd --gid 10001 sidecar \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin sidecar \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/backup-sidecar \
 && install -d -o 10001 -g 10001 -m 0750 /locks

COPY --from=builder /opt/venv /opt/venv

# /backups is deliberately NOT created here: NAS_PATH=/backups must be a mounted volume, and a directory the
# image made would let an unmounted volume fill the container's own disk wherever the root file system is
# writable (the NAS target also refuses a directory that is not on a mount and lacks the marker of an
# earlier use, see NAS_REQUIRE_MOUNT). The volume must be writable by uid 10001: Kubernetes fsGroup 10001,
# or for a fresh Docker/Podman named volume (created root-owned) a one-shot `chown 10001:10001` or a bind
# mount owned by 10001. /locks is made for the lock volume, owned by the runtime user so a fresh named
# volume mounted there inherits that ownership. No VOLUME instruction: it would create anonymous volumes
# nobody asked for. NAS_PATH is not set here (setting it turns the NAS target on); with no target
# configured at all the app's default ./backups resolves to /var/lib/backup-sidecar/backups under WORKDIR,
# created on first use: a try-out, not a vault.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/backup-sidecar
USER 10001:10001
EXPOSE 8080

# `python3 -m healthcheck` asks the running sidecar's /health and exits 0 OK, 1 WARNING, 2 CRITICAL,
# 3 UNKNOWN; Docker counts any non-zero exit as a failed probe. start-period covers start-up (and a
# BACKUP_ON_START backup): failures inside it do not count.
HEALTHCHECK --interval=60s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python3", "-m", "healthcheck"]

# Exec form: backup-sidecar is PID 1 and receives SIGTERM itself (the app handles it: finishes or aborts the
# running dump cleanly and exits). No init process is needed; `docker run --init` adds one if wanted.
ENTRYPOINT ["backup-sidecar"]
CMD ["run"]
