// panguc stand-in for CANN's tiling/platform/platform_ascendc.h: the
// platform queries generated tiling functions use, with the real names and
// signatures. Compile checks only (see ../../README.md).
#ifndef PANGUC_STUB_PLATFORM_ASCENDC_H
#define PANGUC_STUB_PLATFORM_ASCENDC_H

#include <cstdint>

namespace fe {
class PlatFormInfos;
}  // namespace fe

namespace platform_ascendc {
class PlatformAscendC {
public:
    PlatformAscendC() = delete;
    explicit PlatformAscendC(fe::PlatFormInfos* platform_info);
    uint32_t GetCoreNum() const;
    uint32_t GetCoreNumAic() const;
    uint32_t GetCoreNumAiv() const;
    uint32_t GetLibApiWorkSpaceSize() const;
};
}  // namespace platform_ascendc

#endif
