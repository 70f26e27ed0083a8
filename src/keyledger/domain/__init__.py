"""The domain: aggregates and their events. Pure: stdlib and eventsourcing.domain only."""
