"""modelstack agent: runs, watches and heals the model instances of one host.

    assignment   the desired state (shared contract with the controller)
    config       agent.toml and the token file
    commands     pure command builders per backend
    models       model sources and downloads
    procs        processes, records for adoption, stopping by group
    runner       one instance's reconcile step
    reconcile    the loop over all instances, assignment validation, status
    api          the HTTP API; metrics: Prometheus text; gpu: GPU metrics
    main         `stack-agent` (run, status)
"""
