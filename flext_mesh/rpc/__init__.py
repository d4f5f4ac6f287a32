"""What every layer may use to talk gRPC: channels and their options, servicer
registration, interceptors, payload conversion, and status <-> error mapping."""
