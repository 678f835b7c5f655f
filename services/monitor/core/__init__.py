"""The monitor's pure core: its configuration (`config`), the detectors (`baseline`, `geography`, `bursts`), the
action budget (`budget`) and the engine that runs them on batches of audit events (`engine`). No grpc, no
protobuf, no database driver: time is the events' own and the injected clock."""
