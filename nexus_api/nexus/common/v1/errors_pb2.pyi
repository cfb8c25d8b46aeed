from google.protobuf.internal import extension_dict as _extension_dict
from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.rpc import code_pb2 as _code_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    REQUEST_INVALID: _ClassVar[ErrorReason]
    PAGE_TOKEN_INVALID: _ClassVar[ErrorReason]
    REQUEST_ID_CONFLICT: _ClassVar[ErrorReason]
    WORKFLOW_NOT_FOUND: _ClassVar[ErrorReason]
    WORKFLOW_ALREADY_EXISTS: _ClassVar[ErrorReason]
    WORKFLOW_NAME_INVALID: _ClassVar[ErrorReason]
    WORKFLOW_INVALID: _ClassVar[ErrorReason]
    CODE_NODES_DISABLED: _ClassVar[ErrorReason]
    WORKFLOW_NOT_DELETABLE: _ClassVar[ErrorReason]
    INPUTS_INVALID: _ClassVar[ErrorReason]
    EXECUTION_NOT_FOUND: _ClassVar[ErrorReason]
    NODE_FAILED: _ClassVar[ErrorReason]
    EXECUTION_TIMEOUT: _ClassVar[ErrorReason]
    EXECUTION_CANCELLED: _ClassVar[ErrorReason]
    EXECUTION_INTERRUPTED: _ClassVar[ErrorReason]
    EXECUTION_ALREADY_FINISHED: _ClassVar[ErrorReason]
    EXECUTION_LOST: _ClassVar[ErrorReason]
    MODEL_NOT_FOUND: _ClassVar[ErrorReason]
    RECORD_NOT_FOUND: _ClassVar[ErrorReason]
    RECORD_ALREADY_EXISTS: _ClassVar[ErrorReason]
    RECORD_INVALID: _ClassVar[ErrorReason]
    QUERY_INVALID: _ClassVar[ErrorReason]
    CONSTRAINT_VIOLATION: _ClassVar[ErrorReason]
    TRANSACTION_CONFLICT: _ClassVar[ErrorReason]
    DATABASE_UNAVAILABLE: _ClassVar[ErrorReason]
    DEPENDENCY_UNAVAILABLE: _ClassVar[ErrorReason]
    INTERNAL_ERROR: _ClassVar[ErrorReason]
    ROUTE_NOT_FOUND: _ClassVar[ErrorReason]
    REQUEST_TOO_LARGE: _ClassVar[ErrorReason]
    SERVER_UNAVAILABLE: _ClassVar[ErrorReason]
    GATEWAY_TIMEOUT: _ClassVar[ErrorReason]
    CREDENTIALS_MISSING: _ClassVar[ErrorReason]
    CREDENTIALS_INVALID: _ClassVar[ErrorReason]
    CREDENTIALS_EXPIRED: _ClassVar[ErrorReason]
    PERMISSION_DENIED: _ClassVar[ErrorReason]
    API_KEY_NOT_FOUND: _ClassVar[ErrorReason]
    API_KEY_ALREADY_EXISTS: _ClassVar[ErrorReason]
    API_KEYS_UNAVAILABLE: _ClassVar[ErrorReason]
    AUTH_PROVIDER_UNAVAILABLE: _ClassVar[ErrorReason]
    AUDIT_TABLE_DISABLED: _ClassVar[ErrorReason]
    RATE_LIMITED: _ClassVar[ErrorReason]
    OVERLOADED: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
REQUEST_INVALID: ErrorReason
PAGE_TOKEN_INVALID: ErrorReason
REQUEST_ID_CONFLICT: ErrorReason
WORKFLOW_NOT_FOUND: ErrorReason
WORKFLOW_ALREADY_EXISTS: ErrorReason
WORKFLOW_NAME_INVALID: ErrorReason
WORKFLOW_INVALID: ErrorReason
CODE_NODES_DISABLED: ErrorReason
WORKFLOW_NOT_DELETABLE: ErrorReason
INPUTS_INVALID: ErrorReason
EXECUTION_NOT_FOUND: ErrorReason
NODE_FAILED: ErrorReason
EXECUTION_TIMEOUT: ErrorReason
EXECUTION_CANCELLED: ErrorReason
EXECUTION_INTERRUPTED: ErrorReason
EXECUTION_ALREADY_FINISHED: ErrorReason
EXECUTION_LOST: ErrorReason
MODEL_NOT_FOUND: ErrorReason
RECORD_NOT_FOUND: ErrorReason
RECORD_ALREADY_EXISTS: ErrorReason
RECORD_INVALID: ErrorReason
QUERY_INVALID: ErrorReason
CONSTRAINT_VIOLATION: ErrorReason
TRANSACTION_CONFLICT: ErrorReason
DATABASE_UNAVAILABLE: ErrorReason
DEPENDENCY_UNAVAILABLE: ErrorReason
INTERNAL_ERROR: ErrorReason
ROUTE_NOT_FOUND: ErrorReason
REQUEST_TOO_LARGE: ErrorReason
SERVER_UNAVAILABLE: ErrorReason
GATEWAY_TIMEOUT: ErrorReason
CREDENTIALS_MISSING: ErrorReason
CREDENTIALS_INVALID: ErrorReason
CREDENTIALS_EXPIRED: ErrorReason
PERMISSION_DENIED: ErrorReason
API_KEY_NOT_FOUND: ErrorReason
API_KEY_ALREADY_EXISTS: ErrorReason
API_KEYS_UNAVAILABLE: ErrorReason
AUTH_PROVIDER_UNAVAILABLE: ErrorReason
AUDIT_TABLE_DISABLED: ErrorReason
RATE_LIMITED: ErrorReason
OVERLOADED: ErrorReason
CODE_FIELD_NUMBER: _ClassVar[int]
code: _extension_dict._ExtensionFieldDescriptor[_descriptor_pb2.EnumValueOptions, int]
