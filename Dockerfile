# Placeholder until the packaging issue: the agent in a container, with the Docker socket and /sys mounted.
FROM python:3.11-slim
WORKDIR /opt/drove-agent
COPY pyproject.toml README.md ./
COPY agent ./agent
RUN pip install --no-cache-dir .
ENTRYPOINT ["drove-agent"]
CMD ["run", "--config", "/etc/drove-agent/agent.yaml"]
