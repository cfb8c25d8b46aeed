from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Model(_message.Message):
    __slots__ = ("name", "description", "fields", "collection", "service", "message_type", "table", "unique_together")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_TOGETHER_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    fields: _containers.RepeatedCompositeFieldContainer[ModelField]
    collection: str
    service: str
    message_type: str
    table: str
    unique_together: _containers.RepeatedCompositeFieldContainer[FieldGroup]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., fields: _Optional[_Iterable[_Union[ModelField, _Mapping]]] = ..., collection: _Optional[str] = ..., service: _Optional[str] = ..., message_type: _Optional[str] = ..., table: _Optional[str] = ..., unique_together: _Optional[_Iterable[_Union[FieldGroup, _Mapping]]] = ...) -> None: ...

class FieldGroup(_message.Message):
    __slots__ = ("fields",)
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, fields: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelField(_message.Message):
    __slots__ = ("name", "type", "nullable", "default", "primary_key", "unique", "generated", "enum_values", "description", "indexed", "managed", "searchable")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NULLABLE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_KEY_FIELD_NUMBER: _ClassVar[int]
    UNIQUE_FIELD_NUMBER: _ClassVar[int]
    GENERATED_FIELD_NUMBER: _ClassVar[int]
    ENUM_VALUES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    MANAGED_FIELD_NUMBER: _ClassVar[int]
    SEARCHABLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    nullable: bool
    default: _struct_pb2.Value
    primary_key: bool
    unique: bool
    generated: bool
    enum_values: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Value]
    description: str
    indexed: bool
    managed: bool
    searchable: bool
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., nullable: _Optional[bool] = ..., default: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., primary_key: _Optional[bool] = ..., unique: _Optional[bool] = ..., generated: _Optional[bool] = ..., enum_values: _Optional[_Iterable[_Union[_struct_pb2.Value, _Mapping]]] = ..., description: _Optional[str] = ..., indexed: _Optional[bool] = ..., managed: _Optional[bool] = ..., searchable: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CreateRecordRequest(_message.Message):
    __slots__ = ("model", "record", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    record: _struct_pb2.Struct
    request_id: str
    def __init__(self, model: _Optional[str] = ..., record: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetRecordRequest(_message.Message):
    __slots__ = ("model", "id", "fields")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    id: str
    fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., id: _Optional[str] = ..., fields: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateRecordRequest(_message.Message):
    __slots__ = ("model", "id", "record", "update_mask", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    id: str
    record: _struct_pb2.Struct
    update_mask: _field_mask_pb2.FieldMask
    request_id: str
    def __init__(self, model: _Optional[str] = ..., id: _Optional[str] = ..., record: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeleteRecordRequest(_message.Message):
    __slots__ = ("model", "id", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    id: str
    request_id: str
    def __init__(self, model: _Optional[str] = ..., id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ListRecordsRequest(_message.Message):
    __slots__ = ("model", "filter", "order_by", "page_size", "page_token", "fields")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    filter: _struct_pb2.Struct
    order_by: str
    page_size: int
    page_token: str
    fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., filter: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., order_by: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., fields: _Optional[_Iterable[str]] = ...) -> None: ...

class ListRecordsResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SearchRecordsRequest(_message.Message):
    __slots__ = ("model", "q", "filter", "page_size", "page_token", "fields")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    q: str
    filter: _struct_pb2.Struct
    page_size: int
    page_token: str
    fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., q: _Optional[str] = ..., filter: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., fields: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchRecordsResponse(_message.Message):
    __slots__ = ("records", "scores", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    scores: _containers.RepeatedScalarFieldContainer[float]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., scores: _Optional[_Iterable[float]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CountRecordsRequest(_message.Message):
    __slots__ = ("model", "filter")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    model: str
    filter: _struct_pb2.Struct
    def __init__(self, model: _Optional[str] = ..., filter: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class CountRecordsResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class UpsertRecordRequest(_message.Message):
    __slots__ = ("model", "record", "conflict_on", "update_mask", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    CONFLICT_ON_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    record: _struct_pb2.Struct
    conflict_on: _containers.RepeatedScalarFieldContainer[str]
    update_mask: _field_mask_pb2.FieldMask
    request_id: str
    def __init__(self, model: _Optional[str] = ..., record: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., conflict_on: _Optional[_Iterable[str]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class UpsertRecordResponse(_message.Message):
    __slots__ = ("record", "created")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    record: _struct_pb2.Struct
    created: bool
    def __init__(self, record: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class BulkCreateRecordsRequest(_message.Message):
    __slots__ = ("model", "records", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    records: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., records: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class BulkCreateRecordsResponse(_message.Message):
    __slots__ = ("created_count",)
    CREATED_COUNT_FIELD_NUMBER: _ClassVar[int]
    created_count: int
    def __init__(self, created_count: _Optional[int] = ...) -> None: ...

class BulkUpdateRecordsRequest(_message.Message):
    __slots__ = ("model", "filter", "values", "allow_all", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ALLOW_ALL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    filter: _struct_pb2.Struct
    values: _struct_pb2.Struct
    allow_all: bool
    request_id: str
    def __init__(self, model: _Optional[str] = ..., filter: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., values: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., allow_all: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class BulkUpdateRecordsResponse(_message.Message):
    __slots__ = ("updated_count",)
    UPDATED_COUNT_FIELD_NUMBER: _ClassVar[int]
    updated_count: int
    def __init__(self, updated_count: _Optional[int] = ...) -> None: ...

class BulkDeleteRecordsRequest(_message.Message):
    __slots__ = ("model", "filter", "allow_all", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ALLOW_ALL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    filter: _struct_pb2.Struct
    allow_all: bool
    request_id: str
    def __init__(self, model: _Optional[str] = ..., filter: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., allow_all: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class BulkDeleteRecordsResponse(_message.Message):
    __slots__ = ("deleted_count",)
    DELETED_COUNT_FIELD_NUMBER: _ClassVar[int]
    deleted_count: int
    def __init__(self, deleted_count: _Optional[int] = ...) -> None: ...

class BulkUpsertRecordsRequest(_message.Message):
    __slots__ = ("model", "records", "conflict_on", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CONFLICT_ON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    records: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Struct]
    conflict_on: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., records: _Optional[_Iterable[_Union[_struct_pb2.Struct, _Mapping]]] = ..., conflict_on: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class BulkUpsertRecordsResponse(_message.Message):
    __slots__ = ("upserted_count",)
    UPSERTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    upserted_count: int
    def __init__(self, upserted_count: _Optional[int] = ...) -> None: ...

class Write(_message.Message):
    __slots__ = ("create", "update", "upsert", "delete")
    class Create(_message.Message):
        __slots__ = ("model", "record")
        MODEL_FIELD_NUMBER: _ClassVar[int]
        RECORD_FIELD_NUMBER: _ClassVar[int]
        model: str
        record: _struct_pb2.Struct
        def __init__(self, model: _Optional[str] = ..., record: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
    class Update(_message.Message):
        __slots__ = ("model", "id", "record", "update_mask")
        MODEL_FIELD_NUMBER: _ClassVar[int]
        ID_FIELD_NUMBER: _ClassVar[int]
        RECORD_FIELD_NUMBER: _ClassVar[int]
        UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
        model: str
        id: str
        record: _struct_pb2.Struct
        update_mask: _field_mask_pb2.FieldMask
        def __init__(self, model: _Optional[str] = ..., id: _Optional[str] = ..., record: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...
    class Upsert(_message.Message):
        __slots__ = ("model", "record", "conflict_on")
        MODEL_FIELD_NUMBER: _ClassVar[int]
        RECORD_FIELD_NUMBER: _ClassVar[int]
        CONFLICT_ON_FIELD_NUMBER: _ClassVar[int]
        model: str
        record: _struct_pb2.Struct
        conflict_on: _containers.RepeatedScalarFieldContainer[str]
        def __init__(self, model: _Optional[str] = ..., record: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., conflict_on: _Optional[_Iterable[str]] = ...) -> None: ...
    class Delete(_message.Message):
        __slots__ = ("model", "id")
        MODEL_FIELD_NUMBER: _ClassVar[int]
        ID_FIELD_NUMBER: _ClassVar[int]
        model: str
        id: str
        def __init__(self, model: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...
    CREATE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    UPSERT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    create: Write.Create
    update: Write.Update
    upsert: Write.Upsert
    delete: Write.Delete
    def __init__(self, create: _Optional[_Union[Write.Create, _Mapping]] = ..., update: _Optional[_Union[Write.Update, _Mapping]] = ..., upsert: _Optional[_Union[Write.Upsert, _Mapping]] = ..., delete: _Optional[_Union[Write.Delete, _Mapping]] = ...) -> None: ...

class WriteResult(_message.Message):
    __slots__ = ("record", "created")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    record: _struct_pb2.Struct
    created: bool
    def __init__(self, record: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class BatchWriteRequest(_message.Message):
    __slots__ = ("writes", "request_id")
    WRITES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    writes: _containers.RepeatedCompositeFieldContainer[Write]
    request_id: str
    def __init__(self, writes: _Optional[_Iterable[_Union[Write, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class BatchWriteResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[WriteResult]
    def __init__(self, results: _Optional[_Iterable[_Union[WriteResult, _Mapping]]] = ...) -> None: ...
