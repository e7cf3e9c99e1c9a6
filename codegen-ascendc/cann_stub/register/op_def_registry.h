// panguc stand-in for CANN's register/op_def_registry.h: declarations of the
// registration and tiling API that generated op_host sources use, with the
// real names and signatures. Compile checks only (see ../README.md).
#ifndef PANGUC_STUB_OP_DEF_REGISTRY_H
#define PANGUC_STUB_OP_DEF_REGISTRY_H

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ge {
using graphStatus = uint32_t;
const graphStatus GRAPH_SUCCESS = 0;
const graphStatus GRAPH_FAILED = 0xFFFFFFFF;
enum DataType {
    DT_FLOAT = 0,
    DT_FLOAT16 = 1,
    DT_INT8 = 2,
    DT_INT32 = 3,
    DT_UINT8 = 4,
    DT_INT16 = 6,
    DT_UINT16 = 7,
    DT_UINT32 = 8,
    DT_INT64 = 9,
    DT_UINT64 = 10,
    DT_DOUBLE = 11,
    DT_BOOL = 12,
    DT_BF16 = 27,
};
enum Format {
    FORMAT_NCHW = 0,
    FORMAT_NHWC = 1,
    FORMAT_ND = 2,
    FORMAT_FRACTAL_NZ = 29,
};
}  // namespace ge

namespace fe {
class PlatFormInfos;
}  // namespace fe

namespace gert {
class Shape {
public:
    size_t GetDimNum() const;
    void SetDimNum(size_t num);
    int64_t GetDim(size_t idx) const;
    Shape& SetDim(size_t idx, int64_t dim_value);
};

class StorageShape {
public:
    const Shape& GetOriginShape() const;
    const Shape& GetStorageShape() const;
};

class TilingData {
public:
    void* GetData();
    size_t GetCapacity() const;
    size_t GetDataSize() const;
    void SetDataSize(size_t size);
};

class TilingContext {
public:
    const StorageShape* GetInputShape(size_t index) const;
    const StorageShape* GetOutputShape(size_t index) const;
    fe::PlatFormInfos* GetPlatformInfo() const;
    ge::graphStatus SetBlockDim(uint32_t block_dim);
    ge::graphStatus SetTilingKey(uint64_t tiling_key);
    TilingData* GetRawTilingData();
    size_t* GetWorkspaceSizes(size_t workspace_count);
};

class InferShapeContext {
public:
    const Shape* GetInputShape(size_t index) const;
    Shape* GetOutputShape(size_t index);
};

class OpImplRegisterV2 {
public:
    using TilingKernelFunc = uint32_t (*)(TilingContext*);
    using InferShapeKernelFunc = uint32_t (*)(InferShapeContext*);
};
}  // namespace gert

namespace ops {
enum Option {
    IGNORE = 0,
    OPTIONAL = 1,
    REQUIRED = 2,
    DYNAMIC = 3,
    VIRTUAL = 4,
};

class OpParamDef {
public:
    OpParamDef& ParamType(Option param_type);
    OpParamDef& DataType(std::vector<ge::DataType> types);
    OpParamDef& Format(std::vector<ge::Format> formats);
};

class OpAICoreDef {
public:
    OpAICoreDef& SetTiling(gert::OpImplRegisterV2::TilingKernelFunc func);
    OpAICoreDef& AddConfig(const char* soc);
};

class OpDef {
public:
    explicit OpDef(const char* type);
    OpParamDef& Input(const char* name);
    OpParamDef& Output(const char* name);
    OpDef& SetInferShape(gert::OpImplRegisterV2::InferShapeKernelFunc func);
    OpAICoreDef& AICore();
};
}  // namespace ops

// Registers the op class `opType` under its own name.
#define OP_ADD(opType, ...) static const opType g_panguc_stub_op_##opType(#opType)

#endif
