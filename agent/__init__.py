"""modelstack agent: runs, watches and heals the model instances of one host.

    assignment   the desired state (shared contract with the controller)
    config       agent.toml and the token file
    commands     pure command builders per backend
    models       model sources and downloads
    procs        processes, records for adoption, stopping by group
    proctable    the process table: /proc on Linux, `ps` and sysctl on macOS
    runner       one instance's reconcile step
    reconcile    the loop over all instances, assignment validation, status
    api          the HTTP API (one JSON error shape)
    json_input   JSON from outside (API bodies, assignment.json), read within bounds
    metrics      Prometheus text of the status, GPU and engine metrics
    engine_metrics   a backend's metrics page mapped to the agent's engine names
    engine_scraper   reading the serving backends' metrics pages on request
    gpu_metrics  reading GPU metrics: NVML for NVIDIA, the vendor tools otherwise
    gpus         the vendor tools' output parsers (shared with the controller's facts)
    errors       `AgentError`, the agent's own error root (no controller imports)
    main         `stack-agent` (run, status)
"""
