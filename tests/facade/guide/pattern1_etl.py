"""Pattern 1, "Complex ETL Service with Template Method": an ETL pipeline.

The guide's class only; ``tests/facade/test_guide.py`` drives it. ``process`` /
``build`` are local (Template Method); ``execute_etl_pipeline`` runs extract, transform
and load as a durable workflow whose steps the control plane calls on the local tap,
transform and target services.
"""

# ruff: noqa: RET505
# The guide's own style: ``else`` after ``return``.

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from flext_mesh import FlextResult, FlextServices
from tests.facade.guide._domain import Json, JsonService

# -- filled in: the domain classes the guide leaves undefined ---------------------------
# A tiny in-memory source and warehouse stand in for Meltano and dbt: the tap extracts
# SOURCE_ROWS into STAGING, the transform keeps the valid rows (an e-mail with "@") and
# normalizes them, the target appends them to WAREHOUSE. Each reports what it handled.

SOURCE_ROWS: list[Json] = [
    {"id": 1, "email": "ADA@example.com"},
    {"id": 2, "email": "grace@example.com "},
    {"id": 3, "email": "not-an-email"},
    {"id": 4, "email": "Linus@Example.com"},
]
STAGING: list[Json] = []
WAREHOUSE: list[Json] = []


class MeltanoTapService(JsonService):
    """Extracts the source rows (a Singer tap)."""

    def handle(self, request: Json) -> FlextResult[Json]:
        STAGING[:] = [dict(row) for row in SOURCE_ROWS]
        return FlextResult.ok({"stream": "users", "records_extracted": len(STAGING)})


class DBTTransformService(JsonService):
    """Drops rows without a valid e-mail and normalizes the rest (a dbt model)."""

    def handle(self, request: Json) -> FlextResult[Json]:
        kept = [
            {**row, "email": row["email"].strip().lower()} for row in STAGING if "@" in row["email"]
        ]
        dropped = len(STAGING) - len(kept)
        STAGING[:] = kept
        return FlextResult.ok({"models": 1, "records_dropped": dropped})


class MeltanoTargetService(JsonService):
    """Loads the staged rows into the warehouse (a Singer target)."""

    def handle(self, request: Json) -> FlextResult[Json]:
        loaded = list(STAGING)
        WAREHOUSE.extend(loaded)
        STAGING.clear()
        return FlextResult.ok({"records_processed": len(loaded)})


@dataclass(frozen=True)
class ETLRequest:
    """What a client asks for: a pipeline from a source to a target."""

    source_type: str
    target_type: str
    source_config: dict[str, Any]
    target_config: dict[str, Any]
    singer_schema: dict[str, Any]
    transformations: list[str] = field(default_factory=list)
    schedule: str | None = None


@dataclass
class ETLPipeline:
    """A pipeline as created by ``process``."""

    id: str
    source_type: str
    target_type: str
    singer_schema: dict[str, Any]
    transformations: list[str]
    schedule: str | None
    status: str
    estimated_records: int = len(SOURCE_ROWS)
    estimated_duration_minutes: float = 1.0
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class ETLResponse:
    """What ``build`` returns for a created pipeline."""

    pipeline_id: str
    source_type: str
    target_type: str
    status: str
    estimated_records: int
    estimated_duration_minutes: float
    correlation_id: str
    created_at: datetime


@dataclass(frozen=True)
class ETLExecutionResult:
    """The outcome of one run of a pipeline."""

    pipeline_id: str
    status: str
    records_processed: int
    execution_time_ms: float


# -- the guide's code, verbatim ---------------------------------------------------------


# fmt: off
class ETLDataProcessingService(
    FlextServices.ServiceProcessor[ETLRequest, ETLPipeline, ETLResponse]
):
    """Advanced ETL processing using Template Method pattern."""

    def __init__(self):
        super().__init__()
        self.orchestrator = FlextServices.ServiceOrchestrator()
        self._setup_etl_components()

    def _setup_etl_components(self):
        """Setup ETL component services."""
        tap_service = MeltanoTapService()
        target_service = MeltanoTargetService()
        transform_service = DBTTransformService()

        self.orchestrator.register_service("tap", tap_service)
        self.orchestrator.register_service("target", target_service)
        self.orchestrator.register_service("transform", transform_service)

    def process(self, request: ETLRequest) -> FlextResult[ETLPipeline]:
        """Process ETL request with comprehensive validation."""

        # ETL configuration validation
        if not request.source_config or not request.target_config:
            return FlextResult[ETLPipeline].fail("Source and target configuration required")

        # Singer schema validation
        schema_result = self._validate_singer_schema(request.singer_schema)
        if schema_result.is_failure:
            return schema_result

        # Create ETL pipeline
        pipeline = ETLPipeline(
            id=self._generate_pipeline_id(),
            source_type=request.source_type,
            target_type=request.target_type,
            singer_schema=request.singer_schema,
            transformations=request.transformations,
            schedule=request.schedule,
            status="created"
        )

        # ETL business rule validation
        compatibility_result = self._validate_etl_compatibility(pipeline)
        if compatibility_result.is_failure:
            return compatibility_result

        return FlextResult[ETLPipeline].ok(pipeline)

    def build(self, pipeline: ETLPipeline, *, correlation_id: str) -> ETLResponse:
        """Build ETL response with execution metadata."""
        return ETLResponse(
            pipeline_id=pipeline.id,
            source_type=pipeline.source_type,
            target_type=pipeline.target_type,
            status=pipeline.status,
            estimated_records=pipeline.estimated_records,
            estimated_duration_minutes=pipeline.estimated_duration_minutes,
            correlation_id=correlation_id,
            created_at=pipeline.created_at
        )

    def execute_etl_pipeline(self, pipeline_id: str) -> FlextResult[ETLExecutionResult]:
        """Execute ETL pipeline using service orchestration."""

        etl_workflow = {
            "workflow_id": f"etl_{pipeline_id}",
            "steps": [
                {"step": "extract", "service": "tap", "timeout_ms": 300000},
                {"step": "transform", "service": "transform", "depends_on": ["extract"]},
                {"step": "load", "service": "target", "depends_on": ["transform"]}
            ]
        }

        workflow_result = self.orchestrator.orchestrate_workflow(etl_workflow)

        if workflow_result.success:
            return FlextResult[ETLExecutionResult].ok(
                ETLExecutionResult(
                    pipeline_id=pipeline_id,
                    status="completed",
                    records_processed=workflow_result.value.get("total_records", 0),
                    execution_time_ms=workflow_result.value.get("duration_ms", 0)
                )
            )
        else:
            return FlextResult[ETLExecutionResult].fail(workflow_result.error)
# fmt: on

# -- filled in: the helper methods the guide leaves undefined ---------------------------

#: Source and target types this pipeline knows how to connect.
_COMPATIBLE = {("tap-postgres", "target-snowflake"), ("tap-csv", "target-postgres")}


def _validate_singer_schema(
    self: ETLDataProcessingService, singer_schema: dict[str, Any]
) -> FlextResult[None]:
    """A Singer schema is an object schema with properties."""
    if singer_schema.get("type") != "object" or not singer_schema.get("properties"):
        return FlextResult.fail(
            "singer_schema must be an object schema with properties", code="INVALID_ARGUMENT"
        )
    return FlextResult.ok(None)


def _generate_pipeline_id(self: ETLDataProcessingService) -> str:
    """A short unique pipeline id (usable in a workflow name)."""
    return f"pipeline-{uuid.uuid4().hex[:12]}"


def _validate_etl_compatibility(
    self: ETLDataProcessingService, pipeline: ETLPipeline
) -> FlextResult[None]:
    """FAILED_PRECONDITION for a source and target this pipeline cannot connect."""
    if (pipeline.source_type, pipeline.target_type) not in _COMPATIBLE:
        return FlextResult.fail(
            f"cannot load {pipeline.source_type} into {pipeline.target_type}",
            code="FAILED_PRECONDITION",
        )
    return FlextResult.ok(None)


ETLDataProcessingService._validate_singer_schema = _validate_singer_schema
ETLDataProcessingService._generate_pipeline_id = _generate_pipeline_id
ETLDataProcessingService._validate_etl_compatibility = _validate_etl_compatibility
