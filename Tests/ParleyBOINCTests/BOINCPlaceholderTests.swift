import Testing
@testable import ParleyWorkBOINC

@Suite struct BOINCPlaceholderTests {
    @Test func moduleLinks() { _ = BOINCFrontEnd.self }
}
