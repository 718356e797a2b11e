"""What notify does with the records it consumes: queue routes, attempt deliveries."""
