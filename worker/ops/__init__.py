"""Operations: JSON logs, Prometheus metrics, health probes, the embedded Redis, the demo, the autoscaling simulator."""
