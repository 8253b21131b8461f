"""What every Tandem inference server shares: the engine contract, the servicer, the gRPC shell."""
