// swift-tools-version:6.1
// libFuzzer targets for Parley's wire decoder and state machines. See FuzzTesting/README.md.
import PackageDescription

let package = Package(
    name: "ParleyFuzz",
    dependencies: [.package(name: "parley", path: "..")],
    targets: [
        .executableTarget(
            name: "FuzzWireDecoder",
            dependencies: [.product(name: "_ParleyWire", package: "parley")]
        )
    ]
)
