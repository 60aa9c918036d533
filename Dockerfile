# The agent in a container. Build:  docker build -t drove-agent:0.1.0 .
# Run (the agent manages the host's Docker engine, so it needs its socket, /sys and the host's
# pid namespace for cgroup usage; host networking so controllers reach it at the host's name):
#
#   docker run -d --name drove-agent --restart on-failure \
#     --network host --pid host \
#     -v /var/run/docker.sock:/var/run/docker.sock \
#     --group-add "$(stat -c %g /var/run/docker.sock)" \
#     -v /sys:/sys:ro \
#     -v /etc/drove-agent:/etc/drove-agent:ro \
#     -v /var/lib/drove-agent:/var/lib/drove-agent \
#     -v /var/log/drove-agent:/var/log/drove-agent \
#     drove-agent:0.1.0
#
# It runs as the unprivileged user "drove" (uid 10001): membership of the socket's group is all it
# needs. Give /var/lib/drove-agent and /var/log/drove-agent to uid 10001 on the host.

FROM python:3.11.10-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY agent ./agent
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c requirements.lock .

FROM python:3.11.10-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 drove \
    && useradd --system --uid 10001 --gid drove --home-dir /var/lib/drove-agent --no-create-home drove \
    && install -d -o drove -g drove /var/lib/drove-agent /var/log/drove-agent/tasks
COPY config/agent.yaml /etc/drove-agent/agent.yaml
USER 10001:10001
EXPOSE 3000
HEALTHCHECK --interval=30s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/apis/v1/ping', timeout=2)"]
ENTRYPOINT ["drove-agent"]
CMD ["run", "--config", "/etc/drove-agent/agent.yaml"]
