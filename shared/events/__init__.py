"""Event contracts: one module per family, every model registered by its versioned schema name."""

from shared.events.audit import AccessLogged, AuditAction, AuditOutcome
from shared.events.base import Event, Model, SchemaRegistry, registry
from shared.events.common import (
    REPORT_SOP_CLASSES,
    BsnStatus,
    DeliveryChannel,
    IngestChannel,
    InstanceRef,
    PatientRef,
    ReportKind,
    ReportRef,
    SeriesSummary,
    StudySnapshot,
    Urgency,
)
from shared.events.consent import (
    Basis,
    ConsentChecked,
    ConsentRegistered,
    ConsentRevoked,
    Decision,
    Provision,
    Purpose,
    TreatmentRelationshipEnded,
    TreatmentRelationshipRegistered,
)
from shared.events.delivery import (
    Delivered,
    DeliveryFailed,
    DeliveryQueued,
    InstanceOutcomes,
    RefusedInstance,
    delivery_key,
)
from shared.events.ingest import InstanceStored, StudyReceived
from shared.events.routing import Destination, RouteFailed, RouteResolved

__all__ = [
    "REPORT_SOP_CLASSES",
    "AccessLogged",
    "AuditAction",
    "AuditOutcome",
    "Basis",
    "BsnStatus",
    "ConsentChecked",
    "ConsentRegistered",
    "ConsentRevoked",
    "Decision",
    "Delivered",
    "DeliveryChannel",
    "DeliveryFailed",
    "DeliveryQueued",
    "Destination",
    "Event",
    "IngestChannel",
    "InstanceOutcomes",
    "InstanceRef",
    "InstanceStored",
    "Model",
    "PatientRef",
    "Provision",
    "Purpose",
    "RefusedInstance",
    "ReportKind",
    "ReportRef",
    "RouteFailed",
    "RouteResolved",
    "SchemaRegistry",
    "SeriesSummary",
    "StudyReceived",
    "StudySnapshot",
    "TreatmentRelationshipEnded",
    "TreatmentRelationshipRegistered",
    "Urgency",
    "delivery_key",
    "registry",
]
