# Stand-in for the template's intf.cmake.
add_library(intf_pub INTERFACE)
