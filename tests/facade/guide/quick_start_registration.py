"""Quick Start, "Basic Template Method Service": user registration.

Runs the guide's usage code when executed (see the package docstring).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from flext_mesh import FlextResult, FlextServices

# deviation: the guide also imports ``from flext_core.typings import FlextTypes``, which
# it never uses and flext-mesh does not have; ``FlextServices`` and ``FlextResult`` come
# from ``flext_mesh`` instead of ``flext_core.services`` / ``flext_core.result``.

# -- filled in: the domain classes and the request the guide leaves undefined ----------


@dataclass(frozen=True)
class UserRequest:
    """What a client sends to register."""

    email: str
    name: str


@dataclass(frozen=True)
class User:
    """A registered user (the id is assigned on creation)."""

    email: str
    name: str
    created_at: datetime
    id: str = field(default_factory=lambda: f"user-{uuid.uuid4().hex[:12]}")


@dataclass(frozen=True)
class UserResponse:
    """What registration returns."""

    user_id: str
    email: str
    name: str
    correlation_id: str
    timestamp: datetime


request = UserRequest(email="  Ada@Example.COM ", name=" Ada Lovelace ")

# -- the guide's code, verbatim ---------------------------------------------------------


# fmt: off
# Template Method service with generic type parameters
class UserRegistrationService(
    FlextServices.ServiceProcessor[UserRequest, User, UserResponse]
):
    """User registration using Template Method pattern."""

    def process(self, request: UserRequest) -> FlextResult[User]:
        """Process request into domain object (business logic only)."""

        # Business validation
        if not request.email or "@" not in request.email:
            return FlextResult[User].fail("Invalid email address")

        # Create domain object
        user = User(
            email=request.email.lower().strip(),
            name=request.name.strip(),
            created_at=datetime.utcnow()
        )

        return FlextResult[User].ok(user)

    def build(self, user: User, *, correlation_id: str) -> UserResponse:
        """Build final result (pure function)."""
        return UserResponse(
            user_id=user.id,
            email=user.email,
            name=user.name,
            correlation_id=correlation_id,
            timestamp=datetime.utcnow()
        )

# Usage with automatic metrics and correlation
user_service = UserRegistrationService()
result = user_service.run_with_metrics("user_registration", request)

if result.success:
    print(f"User registered: {result.value.user_id}")
else:
    print(f"Registration failed: {result.error}")
# fmt: on
