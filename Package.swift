// swift-tools-version:6.1
import PackageDescription

let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
    name: "parley",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "Parley", targets: ["Parley"]),
        .library(name: "ParleyServices", targets: ["ParleyServices"]),
        // The SwiftNIO layer: channel handlers, transports and the in-memory channel pair.
        .library(name: "ParleyNIO", targets: ["ParleyNIO"]),
        .executable(name: "parley", targets: ["ParleyCLI"]),
        // Not API: the wire layer, exposed for the fuzzing package (FuzzTesting/).
        .library(name: "_ParleyWire", targets: ["ParleyWire"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.81.0"),
        .package(url: "https://github.com/apple/swift-protobuf.git", from: "1.39.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.5.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.6.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.0.0"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.0.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.0"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.0"),
        .package(url: "https://github.com/groue/GRDB.swift.git", from: "7.10.0"),
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.0"),
        .package(url: "https://github.com/CoreOffice/XMLCoder.git", from: "0.18.0"),
    ],
    targets: [
        // Layer 0: CRC32C with SSE4.2 / ARMv8 CRC instructions and a table fallback.
        .target(name: "CParleyCRC32C"),
        // AEAD sealing and opening in place with the BoringSSL that swift-crypto links (its
        // Swift API always allocates its output; docs/performance.md, "Parley secure").
        .target(name: "CParleyAEAD"),
        // Waiting on a socket without sleeping (`PeerWait`): finding a NIO channel's descriptor
        // by its SO_COOKIE and polling FIONREAD; nothing in Glibc or SwiftNIO does either.
        .target(name: "CParleySocket"),
        // Layer 1: pure wire codec and sans-IO state machines (no channel, clock or randomness).
        .target(
            name: "ParleyWire",
            dependencies: [
                "CParleyCRC32C", "CParleyAEAD",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            swiftSettings: swiftSettings
        ),
        // Layer 2: SwiftNIO channel handlers and transports (TCP, Unix, in-memory, TLS, WebSocket).
        .target(
            name: "ParleyNIO",
            dependencies: [
                "ParleyWire", "CParleySocket",
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            swiftSettings: swiftSettings
        ),
        // The fault proxy (`parley chaos`): a seeded plan of faults and the NIO proxy applying it.
        .target(
            name: "ParleyChaos",
            dependencies: [
                "ParleyWire", "ParleyNIO",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        // `parley conform`: conformance checks of any Parley server against docs/protocol.md,
        // sending raw bytes built with the wire codec (issue 13).
        .target(
            name: "ParleyConformance",
            dependencies: [
                "ParleyWire", "ParleyNIO", "ParleyServices",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: swiftSettings
        ),
        // Layer 3: the small async/await public API.
        .target(
            name: "Parley",
            dependencies: [
                "ParleyWire", "ParleyNIO",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "X509", package: "swift-certificates"),
            ],
            swiftSettings: swiftSettings
        ),
        // Layer 4: Parley Work, the job scheduler (issue 11): its sans-IO lease rules, job
        // signing and the job store (SQLite through GRDB) so far.
        .target(
            name: "ParleyWork",
            dependencies: [
                "Parley", "ParleyWire", "CParleySpawn",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: swiftSettings
        ),
        // Parley Work's front ends (issue 12): unmodified Buildbot workers (msgpack over
        // WebSocket) and BOINC clients (the scheduler RPC, XML over HTTP) on the same job store.
        .target(
            name: "ParleyWorkBuildbot",
            dependencies: [
                "ParleyWork", "Parley",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        // BOINC's code signing is raw RSA-1024 (PKCS#1 v1.5 type 1 without a DigestInfo), which
        // swift-crypto's Swift API does not offer: this glue calls the BoringSSL it links, as
        // CParleyAEAD does (no RSA package needed, and keys are made by BoringSSL's generator).
        .target(name: "CParleyBOINCRSA"),
        .target(
            name: "ParleyWorkBOINC",
            dependencies: [
                "ParleyWork", "Parley", "CParleyBOINCRSA",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "XMLCoder", package: "XMLCoder"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: swiftSettings
        ),
        // Layer 4: services built on the API (the built-in echo/ping service).
        .target(
            name: "ParleyServices",
            dependencies: [
                "Parley",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        // Linux system calls the block server needs that Glibc does not expose.
        .target(name: "CParleyBlockIO"),
        // Glibc calls the work worker's child processes need that Glibc does not expose.
        .target(name: "CParleySpawn"),
        // Layer 4: Parley Block, RNBD's block protocol on Parley and a standard NBD server.
        .target(
            name: "ParleyBlock",
            dependencies: [
                "Parley", "CParleyBlockIO",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            swiftSettings: swiftSettings
        ),
        // Layer 5: the `parley` command.
        .executableTarget(
            name: "ParleyCLI",
            dependencies: [
                "Parley", "ParleyServices", "ParleyWire", "ParleyBlock", "ParleyChaos", "ParleyWork", "ParleyConformance",
                "ParleyWorkBuildbot", "ParleyWorkBOINC",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "UnixSignals", package: "swift-service-lifecycle"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: swiftSettings
        ),
        // Helpers shared by the test targets.
        .target(
            name: "ParleyTestSupport",
            dependencies: [
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            path: "Tests/ParleyTestSupport", swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ParleyWorkTests",
            dependencies: [
                "ParleyWork", "ParleyWire", "Parley", "ParleyTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "PostgresNIO", package: "postgres-nio"),
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ParleyWireTests",
            dependencies: [
                "ParleyWire", "CParleyCRC32C", "ParleyServices", "ParleyBlock", "ParleyWork", "ParleyTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ParleyIntegrationTests",
            dependencies: [
                "Parley", "ParleyServices", "ParleyWire", "ParleyNIO", "ParleyTestSupport", "ParleyChaos", "ParleyWork", "ParleyConformance",
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ParleyBuildbotTests",
            dependencies: [
                "ParleyWorkBuildbot", "ParleyWork", "Parley", "ParleyTestSupport",
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ParleyBOINCTests",
            dependencies: [
                "ParleyWorkBOINC", "ParleyWork", "Parley", "ParleyTestSupport",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTesting", package: "hummingbird"),
                .product(name: "XMLCoder", package: "XMLCoder"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            // Read through #filePath (real client requests, a test key).
            exclude: ["Fixtures"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "ParleyBlockTests",
            dependencies: [
                "ParleyBlock", "Parley", "ParleyTestSupport", "CParleyBlockIO", "CParleySocket",
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: swiftSettings
        ),
    ]
)
